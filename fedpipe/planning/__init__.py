"""Planning: from a cluster profile to a plan — the optimiser and the peer strategies it is judged
against. Torch-free; imports only top-level schemas (profile, shapes, plan, importance), never
training or deployment."""
