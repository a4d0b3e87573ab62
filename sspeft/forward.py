"""Execution paths of SpectralLinear.forward, reached through `adapter_output`. All give the reference's numbers
(base(x) + x·ΔWᵀ with ΔW from `methods.delta_weight`, tested in tests/test_sspeft_forward.py); they differ in cost
and memory:

  reference   base(x) + x·ΔWᵀ through autograd (PEFT's form: a dense ΔW kept for backward, a second matmul).
  merged      one matmul with W0 + ΔW inside a custom autograd Function. Fourier methods build ΔW with one irfft2 of
              the sparse half spectrum; SHiRA/WaveFT write their ≤ n·L² non-zero entries into the weight for the
              duration of the matmul and restore them bitwise (into the dequantized copy of a 4-bit weight). Backward
              rebuilds W0 + ΔW for the input gradient (nothing out×in is saved) and samples the coefficient gradient
              from per-token transforms of x and of the output gradient — no Gᵀ·X product.
  split       base(x) + a per-token synthesis of the adapter output: rfft → gather → scatter → irfft (Fourier) or
              DWT → gather → scatter → inverse DWT (WaveFT; plain gather/scatter for SHiRA). Never reads W0, never
              forms an out×in tensor; costs grow with tokens instead of out×in. The path used under ZeRO-3.
  factorized  base(x) + x·V·diag(w)·Uᵀ with cos/sin (cas for the separable DHT) factor matrices of rank r
              (n for the separable DHT, 2n otherwise), rebuilt in backward; wins when r ≪ the layer width.

`auto` picks per layer and per call from the shape, n and the tokens in flight (`estimate_costs`); the choice
depends on nothing else, so a checkpointed forward recomputes on the same path. Plans (index tables, never out×in)
are cached on each layer, keyed on every input they are built from. See docs/speed.md for measured figures.

Coefficients found in another dtype than fp32 (cast outside sspeft, DeepSpeed aside) are used as they are; the layer
warns about them.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

from . import atoms, weights
from .config import SpectralConfig

# Relative costs for `auto`, in multiply-adds of a large fp32 matmul. Measured on the 2-core CPU machines of
# docs/speed.md; the CUDA row is an estimate (FFTs and gathers are memory-bound there, matmuls far faster).
COST_CONSTANTS = {
    "cpu": dict(fft=6.0, gather=40.0, elementwise=6.0, trig=30.0, fp32_matmul=1.0),
    # fp32 factor products run ~8× slower per multiply-add than the bf16 base matmuls on tensor cores
    "cuda": dict(fft=20.0, gather=60.0, elementwise=20.0, trig=20.0, fp32_matmul=8.0),
}

def _state(layer) -> dict:
    """The layer's execution state — plans, the ΔW cache, the paths last used, warnings given — held on the layer
    itself (copied, pickled and freed with it)."""
    state = layer.__dict__.get("_sspeft_exec")
    if state is None:
        state = {"plans": {}, "delta": {}, "last": {}, "warned": set()}
        layer.__dict__["_sspeft_exec"] = state
    return state


def last_paths(layer) -> dict[str, str]:
    """{adapter: path} used by the layer's most recent forward (for tests, logs and benchmarks)."""
    return dict(_state(layer)["last"])


def _plan_key(layer, name: str) -> tuple:
    """Everything a plan is built from: the config fields it reads (so a changed scaling or wavelet rebuilds it),
    the positions (identity and in-place version) and the layer's shape."""
    cfg: SpectralConfig = layer.sspeft_config[name]
    positions = layer.sspeft_positions[name]
    return (atoms.plan_inputs(cfg), positions.data_ptr(), positions._version, positions.device,
            tuple(positions.shape), layer.shape)


def plan_for(layer, name: str):
    """The cached FourierPlan/SparsePlan of adapter ``name``, rebuilt whenever anything it depends on changed."""
    key = _plan_key(layer, name)
    cached = _state(layer)["plans"].get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    cfg = layer.sspeft_config[name]
    build = atoms.fourier_plan if cfg.method in atoms.FOURIER_METHODS else atoms.sparse_plan
    plan = build(cfg, layer.sspeft_positions[name], layer.shape)
    _state(layer)["plans"][name] = (key, plan)
    return plan


# ---------------------------------------------------------------------------------------------------- choosing
def _zero3(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def estimate_costs(plan, tokens: int, device_type: str = "cpu") -> dict[str, float]:
    """Adapter cost of one forward + backward per path, beyond the base matmuls (multiply-add units)."""
    k = COST_CONSTANTS.get(device_type, COST_CONSTANTS["cuda"])
    m, n = plan.shape
    if isinstance(plan, atoms.SparsePlan):
        touched = plan.entries.numel()
        grad = k["fft"] * tokens * (m + n) + k["gather"] * tokens * plan.k.numel()
        return {"merged": 4 * k["gather"] * touched + grad, "split": 3 * grad}
    n_atoms = plan.atoms
    log_m, log_n = math.log2(max(m, 2)), math.log2(max(n, 2))
    sample = k["fft"] * tokens * (m * log_m + n * log_n) / 2 + 2 * k["gather"] * tokens * n_atoms
    dense = k["fft"] * m * n * (log_m + log_n) / 2 + 3 * k["elementwise"] * m * n
    split = k["fft"] * tokens * (3 * n * log_n + 2 * m * log_m) / 2 + 5 * k["gather"] * tokens * n_atoms
    rank = plan.factor_rank
    factorized = k["fp32_matmul"] * 2 * tokens * rank * (m + n) + 2 * k["trig"] * rank * (m + n)
    return {"merged": 2 * dense + sample, "split": split + k["elementwise"] * tokens * m, "factorized": factorized}


def choose(layer, name: str, tokens: int) -> tuple[str, str]:
    """(path, reason) for adapter ``name`` of ``layer`` at ``tokens`` tokens per call."""
    cfg: SpectralConfig = layer.sspeft_config[name]
    requested = getattr(cfg, "path", "auto")
    base = layer.base_layer
    weight, bias = base.weight, getattr(base, "bias", None)
    if requested == "reference":
        return "reference", "requested"
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "reference", "the base layer's parameters are trainable"
    zero3 = _zero3(weight)
    if requested == "merged" and zero3:
        if name not in _state(layer)["warned"]:
            _state(layer)["warned"].add(name)
            warnings.warn(
                "sspeft: path='merged' reads the base weight outside its module's ZeRO-3 hooks; this layer runs the "
                "'split' path instead (same numbers, never reads W0)", stacklevel=4)
        return "split", "ZeRO-3 partitioned base weight"
    if requested != "auto":
        return requested, "requested"
    if zero3:
        return "split", "ZeRO-3 partitioned base weight"
    costs = estimate_costs(plan_for(layer, name), tokens, weight.device.type)
    best = min(costs, key=costs.get)
    return best, "cost model: " + ", ".join(f"{p}={c:.3g}" for p, c in sorted(costs.items()))


# ---------------------------------------------------------------------------------------------------- dtypes, weights
def _compute_dtype(base, x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if weights.is_linear4bit(base):
        return getattr(base, "compute_dtype", None) or x.dtype
    return base.weight.dtype


def _dequantized(base) -> torch.Tensor:
    """A fresh dense (out, in) copy of a 4-bit weight (what bitsandbytes' own matmul materialises too)."""
    bnb = weights.loaded_bitsandbytes()
    if getattr(base, "support_avx512bf16_for_cpu", False):
        base.support_avx512bf16_for_cpu = False
    weight = base.weight
    dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return dense.reshape(base.out_features, base.in_features)


class _Run:
    """Everything a merged call needs besides its tensors: the layer's base, plan, dtypes and ΔW cache slot."""

    def __init__(self, layer, name: str, plan, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
        self.layer, self.name, self.plan = layer, name, plan
        self.base = layer.base_layer
        self.compute_dtype, self.out_dtype = compute_dtype, out_dtype
        cfg = layer.sspeft_config[name]
        coeff = layer.sspeft_coefficients[name]
        cached = getattr(cfg, "cache_delta", False)
        self.cache_key = (_plan_key(layer, name), coeff.data_ptr(), coeff._version) if cached else None

    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.base, "bias", None)
        return None if bias is None else bias.detach().to(self.compute_dtype)

    def _fourier_delta(self, w: torch.Tensor) -> torch.Tensor:
        if self.cache_key is None:
            return self.plan.dense_delta(w)
        slot = _state(self.layer)["delta"]
        cached = slot.get(self.name)
        if cached is None or cached[0] != self.cache_key:
            cached = (self.cache_key, self.plan.dense_delta(w))
            slot[self.name] = cached
        return cached[1].clone()

    @contextlib.contextmanager
    def weight(self, w: torch.Tensor):
        """W0 + ΔW (out, in) in the compute dtype for the duration of the block."""
        cd = self.compute_dtype
        with torch.no_grad():
            if isinstance(self.plan, atoms.FourierPlan):
                delta = self._fourier_delta(w)
                base = _dequantized(self.base) if weights.is_linear4bit(self.base) else self.base.weight.detach()
                yield delta.add_(base).to(cd)
                return
            values = self.plan.entry_values(w)
            entries = self.plan.entries
            if weights.is_linear4bit(self.base):
                dense = _dequantized(self.base).to(cd)
            else:
                dense = self.base.weight.data
                if dense.dtype != cd or not dense.is_contiguous():
                    dense = dense.to(cd, memory_format=torch.contiguous_format, copy=True)
            flat = dense.view(-1)
            original = flat.index_select(0, entries)
            # A dense base weight is the module's own tensor: its touched entries are restored bitwise on exit.
            # (index_copy_, not flat[entries] = ...: the latter costs a pass over the whole weight on CPU.)
            flat.index_copy_(0, entries, (original.float() + values).to(dense.dtype))
            try:
                yield dense
            finally:
                flat.index_copy_(0, entries, original)

    def coefficient_grad(self, x2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if isinstance(plan, atoms.FourierPlan):
            return plan.atom_grad(plan.analysis_in(x2), plan.analysis_out(g2))
        return plan.coefficient_grad(g2, x2)


# ---------------------------------------------------------------------------------------------------- autograd
class _MergedLinear(torch.autograd.Function):
    """y = x·(W0 + ΔW)ᵀ + b with ΔW = ΔW(w); saves only x and w."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, run: _Run) -> torch.Tensor:
        cd = run.compute_dtype
        with run.weight(w) as weight, torch.autocast(x.device.type, enabled=False):
            y = F.linear(x.to(cd), weight, run.bias())
        ctx.run = run
        ctx.save_for_backward(x, w)
        return y.to(run.out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):  # explicit dtypes; fp32 transforms
            return _MergedLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        run: _Run = ctx.run
        grad_x = grad_w = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            with run.weight(w) as weight:
                grad_x = (g2.to(run.compute_dtype) @ weight).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = run.coefficient_grad(x.reshape(-1, x.shape[-1]), g2)
        return grad_x, grad_w, None


class _SplitAdapter(torch.autograd.Function):
    """x·ΔWᵀ by per-token transforms (the base output is added outside). Saves w and the input's transform at the
    positions (tokens × atoms, or tokens × sampled columns), which backward reuses for the coefficient gradient:
    the input is transformed once per step, not again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, plan, out_dtype: torch.dtype) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # transforms run in fp32 whatever the autocast dtype
            x_spec = plan.analysis_in(x2) if isinstance(plan, atoms.FourierPlan) else plan.sampled_in(x2)
            y = plan.synth_out(w, x_spec)
        ctx.plan, ctx.x_shape, ctx.x_dtype = plan, x.shape, x.dtype
        ctx.save_for_backward(x_spec, w)
        return y.to(out_dtype).view(*x.shape[:-1], plan.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):  # explicit dtypes; fp32 transforms
            return _SplitAdapter._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        x_spec, w = ctx.saved_tensors
        plan = ctx.plan
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        fourier = isinstance(plan, atoms.FourierPlan)
        g_spec = plan.analysis_out(g2) if fourier else plan.sampled_out(g2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = plan.synth_in(w, g_spec).to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if fourier:
                grad_w = plan.atom_grad(x_spec, g_spec)
            else:
                grad_w = (g_spec * x_spec).sum(0) * plan.scale
        return grad_x, grad_w, None, None


class _FactorizedAdapter(torch.autograd.Function):
    """x·ΔWᵀ = ((x·V) ∘ w)·Uᵀ with factor matrices rebuilt in backward; saves x, w and x·V (tokens × rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, plan, out_dtype: torch.dtype) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        with torch.autocast(x.device.type, enabled=False):  # the factor products are the transform: fp32
            u, v = plan.factors(x.device)
            xv = x2 @ v
            y = _mix(plan, xv, w) @ u.t()
        ctx.plan = plan
        ctx.save_for_backward(x, w, xv)
        return y.to(out_dtype).view(*x.shape[:-1], plan.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):  # explicit dtypes; fp32 transforms
            return _FactorizedAdapter._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        x, w, xv = ctx.saved_tensors
        plan = ctx.plan
        u, v = plan.factors(x.device)
        gu = grad_out.reshape(-1, grad_out.shape[-1]).float() @ u
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (_mix(plan, gu, w) @ v.t()).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            if plan.cas_scale is not None:
                grad_w = (xv * gu).sum(0)
            else:
                a = plan.atoms
                grad_w = plan.atom_grad(torch.complex(xv[:, :a], xv[:, a:]), torch.complex(gu[:, :a], gu[:, a:]))
        return grad_x, grad_w, None, None


def _mix(plan, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Between the two factor products: scale by w (cas), or multiply by z and map (re, im) → [re | −im]."""
    if plan.cas_scale is not None:
        return t * w
    a = plan.atoms
    pr, pi = atoms.cmul(w[:, 0], w[:, 1], t[:, :a], t[:, a:])
    return torch.cat([pr, -pi], dim=1)


# ---------------------------------------------------------------------------------------------------- dispatch
def _path_coefficients(layer, name: str, plan, path: str) -> torch.Tensor:
    """The small differentiable vector a fast path consumes: atom weights z (Fourier), coefficients (sparse)."""
    coeff = layer.sspeft_coefficients[name]
    with weights.gathered(coeff):
        if isinstance(plan, atoms.SparsePlan):
            # under ZeRO-3 the gathered storage is released on exit: keep a copy for backward
            return coeff.float().clone() if _zero3(coeff) else coeff.float()
        if path == "factorized" and plan.cas_scale is not None:
            return coeff.float() * plan.cas_scale
        return plan.atom_weights(coeff)


def _reference_branch(layer, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    delta = layer.delta_weight(name)
    return F.linear(x.to(dtype), delta.to(dtype))


def _branch(layer, name: str, path: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if path == "reference":
        return _reference_branch(layer, name, x, dtype)
    plan = plan_for(layer, name)
    w = _path_coefficients(layer, name, plan, path)
    if path == "factorized":
        return _FactorizedAdapter.apply(x, w, plan, dtype)
    return _SplitAdapter.apply(x, w, plan, dtype)


def adapter_output(layer, names: list[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """SpectralLinear's output with adapters ``names`` (active, present, not merged): base(x) plus each adapter's
    term, each on the path `choose` picks (one fused matmul when a single adapter runs merged)."""
    tokens = x.numel() // max(x.shape[-1], 1)
    chosen = [choose(layer, name, tokens)[0] for name in names]
    if len(names) > 1 or args or kwargs:  # several adapters each add their own branch; merging needs exactly one
        chosen = ["split" if p == "merged" else p for p in chosen]
    _state(layer)["last"] = dict(zip(names, chosen))
    if chosen == ["merged"]:
        name = names[0]
        plan = plan_for(layer, name)
        out_dtype = x.dtype if weights.is_linear4bit(layer.base_layer) else _compute_dtype(layer.base_layer, x)
        run = _Run(layer, name, plan, _compute_dtype(layer.base_layer, x), out_dtype)
        return _MergedLinear.apply(x, _path_coefficients(layer, name, plan, "merged"), run)
    result = layer.base_layer(x, *args, **kwargs)
    for name, path in zip(names, chosen):
        result = result + _branch(layer, name, path, x, result.dtype)
    return result
