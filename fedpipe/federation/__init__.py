"""Running a plan: one round loop (`loop`) over transports that carry the messages of
`fedpipe.protocol` to the edge servers (`inprocess` here; Flower in `fedpipe.flower_app`)."""
