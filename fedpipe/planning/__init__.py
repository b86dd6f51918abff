"""Planning: from a cluster profile to a plan. Torch-free; imports only top-level schemas
(profile, shapes, plan, importance), never training or deployment."""
