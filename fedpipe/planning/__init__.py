"""Planning: deciding what every server runs (the optimiser and the peer strategies it is judged against)."""
