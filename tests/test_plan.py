"""The plan schema's derived values: peft's alphas and scales come from one ratio."""

from fedpipe.plan import Prediction, ServerPlan, alpha_pattern


def test_alpha_is_ratio_times_rank_and_scale_is_the_ratio():
    prediction = Prediction(memory_gib=1, memory_budget_gib=2, compute_s=1, upload_s=0, download_s=0,
                            round_s=1, upload_bytes=0, download_bytes=0, lora_params=0)
    entry = ServerPlan(name="edge", members=["edge"], samples=10, bits=16, batch_size=4,
                       rank_pattern={"a.q_proj": 8, "a.v_proj": 4}, lora_alpha_ratio=1.5,
                       importance_covered=0.5, predicted=prediction)
    assert entry.alpha_pattern() == {"a.q_proj": 12.0, "a.v_proj": 6.0}
    assert entry.scales() == {"a.q_proj": 1.5, "a.v_proj": 1.5}
    assert alpha_pattern({"a": 4, "b": 0}, 2.0) == {"a": 8.0}  # rank 0: not adapted, no alpha
