"""The cost model: predicted memory (GiB), round time (s) and bytes for one server's choices.

Every constant is written down here and the uncertain ones are calibrated factors
(``Calibration`` in the profile, measured by ``fedpipe calibrate``):

Memory of a server training with base precision q, batch b, sequence S and LoRA ranks r_m:
  base      = linear_params * q/8 bytes  (+ NF4 double-quant block scales: 1/64 + 4/(64*256) B/param;
              + one fp32 scale per output row at 8 bit; at 16 bit on a CPU the weights stay fp32)
            + other_params (embeddings, lm_head if untied, norms) * compute_bytes
  lora      = sum_m r_m (d_out + d_in) * 16 bytes        (fp32 weight, gradient, two AdamW moments)
            + sum_m b * S * r_m * compute_bytes          (the x A^T intermediate kept for backward)
  activ.    = activation_factor * b * S * layers * (6h + 2kv + 4i [+ heads*S on CPU: eager scores])
              * compute_bytes + b * S * vocab * 12 bytes (fp32 logits, their softmax and gradient)
  overhead  = runtime_overhead_gib (CUDA context / allocator slack / interpreter)

Compute time per round (frozen base: backward computes activation gradients only, so
forward + backward ~ 2 x forward = 4 FLOPs per linear parameter per token):
  flops/token = 2 * (2 * linear_params + 2 * h * vocab + 2 * S * q_dim * layers)
              + 6 * sum_m r_m (d_out + d_in)
  compute_s   = local_steps * b * S * flops/token / (TFLOP/s * 1e12 * utilisation) * dequant_time[q]
                (the dequantization factor applies to the base part only)
Bytes per round (P(r) = sum_m r_m (d_out + d_in) adapter values):
  upload = v(d, p) * P(r_s); download = v(d, p) * P(r_s), except flora: 4 * sum over all servers
  of P(r) (the stack is broadcast dense in float32), with d the server's communication density,
  p its wire precision and v(d, p) = fedpipe.precision.bytes_per_value(d, p) the bytes per
  adapter value: the precision's bytes per value (4 fp32, 2 bf16/fp16, 1 + 4/64 blockwise int8,
  0.5 + 4/64 blockwise 4-bit: codes plus one float32 scale per 64 values) dense; below 1, d times
  that for the top-k values plus min(1/8, 4d) for the mask (a bitmask, or int32 indices where
  fewer: fedpipe.wire's encoding, uint16 indices on small tensors ignored, so this is an upper
  bound up to ceil(d n) and block rounding and the header).
  upload_s = upload * 8 / (uplink_mbps * 1e6); likewise download.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpipe.precision import bytes_per_value
from fedpipe.profile import Calibration, ClusterProfile, Server, Task
from fedpipe.shapes import Matrix, ModelShapes

GIB = float(2**30)
LORA_STATE_BYTES = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + double-quantized block scales
LOGIT_BYTES = 12  # fp32 logits, their log-softmax and gradient per vocabulary entry
WIRE_BYTES_PER_VALUE = bytes_per_value(1.0, "fp32")  # flora's stack travels dense in float32


def compute_bytes(device: str) -> int:
    """bf16 compute on GPUs, fp32 on CPUs (16-bit there means 'not quantized', kept fp32)."""
    return 2 if device == "cuda" else 4


@dataclass(frozen=True)
class CostModel:
    """Cost formulas bound to one model, task and calibration (see the module docstring)."""

    shapes: ModelShapes
    task: Task
    calibration: Calibration

    @classmethod
    def for_profile(cls, profile: ClusterProfile, shapes: ModelShapes) -> CostModel:
        return cls(shapes, profile.task, profile.calibration)

    # ---- memory (GiB) ----
    def base_weights_gib(self, bits: int, device: str) -> float:
        s = self.shapes
        per_param = {4: NF4_BYTES_PER_PARAM, 8: 1.0, 16: compute_bytes(device)}[bits]
        row_scales = 4 * sum(m.d_out for m in s.matrices) if bits == 8 else 0
        return (s.linear_params * per_param + row_scales + s.other_params * compute_bytes(device)) / GIB

    def activations_gib(self, batch: int, device: str) -> float:
        s, seq = self.shapes, self.task.seq_len
        per_token_layer = 6 * s.hidden + 2 * s.kv_heads * s.head_dim + 4 * s.intermediate
        if device == "cpu":
            per_token_layer += s.heads * seq
        layers = batch * seq * s.layers * per_token_layer * compute_bytes(device)
        logits = batch * seq * s.vocab * LOGIT_BYTES
        return (self.calibration.activation_factor * layers + logits) / GIB

    def fixed_memory_gib(self, bits: int, batch: int, device: str) -> float:
        """Everything but the adapters: base weights, activations, runtime overhead."""
        return (self.base_weights_gib(bits, device) + self.activations_gib(batch, device)
                + self.calibration.runtime_overhead_gib)

    def lora_memory_gib(self, m: Matrix, rank: int, batch: int, device: str) -> float:
        state = m.lora_params(rank) * LORA_STATE_BYTES
        activ = batch * self.task.seq_len * rank * compute_bytes(device)
        return (state + activ) / GIB

    # ---- time (s) ----
    def _seconds(self, flops_per_token: float, batch: int, server: Server) -> float:
        tokens = self.task.local_steps * batch * self.task.seq_len
        return tokens * flops_per_token / (server.tflops * 1e12 * self.calibration.utilisation)

    def base_compute_s(self, bits: int, batch: int, server: Server) -> float:
        s = self.shapes
        q_dim = s.heads * s.head_dim
        forward = 2 * s.linear_params + 2 * s.hidden * s.vocab + 2 * self.task.seq_len * q_dim * s.layers
        return self._seconds(2 * forward, batch, server) * self.calibration.dequant_time[bits]

    def lora_compute_s(self, m: Matrix, rank: int, batch: int, server: Server) -> float:
        return self._seconds(6 * m.lora_params(rank), batch, server)

    @staticmethod
    def transfer_s(n_bytes: float, mbps: float) -> float:
        return n_bytes * 8 / (mbps * 1e6)

    # ---- bytes ----
    @staticmethod
    def wire_bytes(m: Matrix, rank: int, density: float = 1.0, precision: str = "fp32") -> float:
        """v(d, p) P(r) of the module docstring: one matrix's adapter on the wire."""
        return bytes_per_value(density, precision) * m.lora_params(rank)


@dataclass(frozen=True)
class ServerCost:
    """Predicted costs of one server's configuration, as recorded in the plan."""

    memory_gib: float
    compute_s: float
    upload_s: float
    download_s: float
    upload_bytes: int
    download_bytes: int
    lora_params: int

    @property
    def round_s(self) -> float:
        return self.compute_s + self.upload_s + self.download_s


def server_cost(cost: CostModel, server: Server, bits: int, batch: int, ranks: dict[str, int],
                matrices: dict[str, Matrix], download_bytes: float, density: float = 1.0,
                precision: str = "fp32") -> ServerCost:
    """Evaluate the formulas for one concrete configuration (the planner's check and report);
    `density` and `precision` are the upload's, `download_bytes` already reflects the download's.

    Every adapter cost is linear in the rank and depends on the matrix only through
    d_out + d_in, so ranks are summed per d_out + d_in first (a few terms, not one per matrix)."""
    by_size: dict[int, tuple[Matrix, int]] = {}
    for n, r in ranks.items():
        if r > 0:
            m = matrices[n]
            rep, total = by_size.get(m.d_out + m.d_in, (m, 0))
            by_size[m.d_out + m.d_in] = (rep, total + r)
    adapted = list(by_size.values())
    memory = cost.fixed_memory_gib(bits, batch, server.device) + sum(
        cost.lora_memory_gib(m, r, batch, server.device) for m, r in adapted)
    compute = cost.base_compute_s(bits, batch, server) + sum(
        cost.lora_compute_s(m, r, batch, server) for m, r in adapted)
    up = round(sum(cost.wire_bytes(m, r, density, precision) for m, r in adapted))
    return ServerCost(
        memory_gib=memory,
        compute_s=compute,
        upload_s=cost.transfer_s(up, server.uplink_mbps),
        download_s=cost.transfer_s(download_bytes, server.downlink_mbps),
        upload_bytes=up,
        download_bytes=round(download_bytes),
        lora_params=sum(m.lora_params(r) for m, r in adapted),
    )
