"""Prompts for the LLM strategy, built from what only a production loop knows: the op's contract
and reference, the incumbent and its timings per shape, the workload profile with its weights, the
hardware, the hypothesis' hints, and every earlier attempt with what became of it."""
import inspect
import re
from dataclasses import dataclass, field
from types import ModuleType

from generator.database import Attempt, Program
from generator.llm import trim
from shared.ops import torch_dtype
from shared.schemas import Campaign, Hardware, ShapeTiming
from shared.variants import ALLOWED_IMPORTS, render

SOURCE_CHARS = 8000  # per program in a prompt
ERROR_CHARS = 400
SHOWN_ATTEMPTS = 10

SYSTEM = f"""You write Triton GPU kernels that replace a PyTorch reference in a production inference service.
Rules, checked before your code runs:
- One self-contained Python file: one or more @triton.jit kernels and a top-level `launch(...)` with the op's exact signature that launches them as kernel[grid](...) and returns the result.
- Imports only from: {", ".join(sorted(ALLOWED_IMPORTS))}.
- Host code (launch and helpers) may only allocate (torch.empty, torch.empty_like, ...), reshape and pick launch parameters; all arithmetic of the op happens in the Triton kernels. Calling torch math (torch.matmul, F.softmax, x.sum(), ...) is rejected.
- No files, network, processes, eval/exec, getattr or dunder attributes.
- Match the reference within the dtype's tolerance on every shape, including odd sizes that no block size divides: mask every load and store. Accumulate in float32; for bfloat16 convert right after loading.
Answer with the complete file in one ```python block, or, to change the parent program a little, with SEARCH/REPLACE edits:
<<<<<<< SEARCH
exact lines of the parent
=======
their replacement
>>>>>>> REPLACE
Say in one or two sentences what you changed and why it should be faster."""


@dataclass
class PromptContext:
    op: ModuleType
    campaign: Campaign
    round: int
    task: str = "mutate"  # mutate: improve the parent; crossover: combine the parent and an inspiration
    parent: Program | None = None
    inspirations: list[Program] = field(default_factory=list)
    incumbent_timings: list[ShapeTiming] = field(default_factory=list)
    hardware_name: str | None = None
    hardware: Hardware | None = None  # SMs and measured peaks, when a benchmark on a GPU has reported them
    programs: dict[str, Program] = field(default_factory=dict)  # outcomes of earlier attempts, by id

    @property
    def parent_source(self) -> str | None:
        """What SEARCH/REPLACE edits apply to: the parent, else the incumbent's source."""
        return self.parent.source if self.parent else incumbent_source(self.op, self.campaign)


def incumbent_source(op: ModuleType, campaign: Campaign) -> str | None:
    if campaign.incumbent.source:
        return campaign.incumbent.source
    template = getattr(op, "TEMPLATE", None)
    if not template or getattr(op, "TEMPLATE_IS_REFERENCE", False):
        return None
    return render(template, op.DEFAULT)


def reference_text(op: ModuleType) -> str:
    text = getattr(op, "REFERENCE_SOURCE", None)  # KernelBench-format ops carry their whole file
    return text if text else inspect.getsource(op.reference)


def contract(op: ModuleType) -> str:
    launch = getattr(op, "LAUNCH_SIGNATURE", None)
    if launch is None:
        template = getattr(op, "TEMPLATE", "") or ""
        found = re.search(r"^def (launch\(.*?\)):", template, re.MULTILINE)
        launch = found.group(1) if found else f"launch{inspect.signature(op.reference)}"
    return f"{(op.__doc__ or '').strip()}\nThe launcher's signature: `{launch}`."


def describe_hardware(hw: Hardware | None, fallback: str) -> str:
    """The GPU as a kernel writer sizes a grid for it: its SMs, and the peaks measured on it."""
    if hw is None:
        return fallback
    facts = [f"{hw.sm_count} SMs" if hw.sm_count else None,
             f"{hw.memory_gib:g} GiB" if hw.memory_gib else None,
             f"measured copy bandwidth {hw.copy_gbps:,.0f} GB/s (bytes read + written)" if hw.copy_gbps else None,
             f"measured bf16 matmul {hw.matmul_tflops:,.0f} TFLOP/s" if hw.matmul_tflops else None]
    facts = [f for f in facts if f]
    return f"{hw.name} ({', '.join(facts)})" if facts else hw.name


def _of_peaks(cost, us: float, hw: Hardware | None) -> str:
    """How far the incumbent is from this GPU's measured peaks: the room a rewrite has."""
    shares = []
    if hw and hw.copy_gbps:
        shares.append(f"{cost.bytes_moved / us / 1e3 / hw.copy_gbps:.0%} of measured copy bandwidth")
    if hw and hw.matmul_tflops and cost.flops:
        shares.append(f"{cost.flops / us / 1e6 / hw.matmul_tflops:.0%} of measured matmul rate")
    return "".join(f", {s}" for s in shares)


def build_messages(ctx: PromptContext, attempts: list[Attempt]) -> list[dict]:
    c, op = ctx.campaign, ctx.op
    dtype = torch_dtype(c.key.dtype)
    parts = [f"# Op `{c.key.op}`, dtype {c.key.dtype}, shape bucket {c.key.bucket}\n{contract(op)}",
             f"## Reference (the ground truth)\n```python\n{trim(reference_text(op), SOURCE_CHARS)}\n```"]

    inc_us = {tuple(t.shape): t.incumbent_us for t in ctx.incumbent_timings}
    lines = []
    for ws in c.profile:
        cost = op.cost(ws.shape, dtype)
        line = f"- shape {ws.shape}: weight {ws.weight:.3g}, {cost.flops:.3g} FLOPs, {cost.bytes_moved:.3g} bytes"
        if tuple(ws.shape) in inc_us:
            us = inc_us[tuple(ws.shape)]
            line += f"; incumbent {us:.1f} us ({cost.bytes_moved / us / 1e3:.2f} GB/s{_of_peaks(cost, us, ctx.hardware)})"
        lines.append(line)
    hardware = describe_hardware(ctx.hardware, ctx.hardware_name or c.key.hardware)
    if c.key.hardware == "cpu-interpreter":
        hardware += " (Triton's interpreter on a CPU: fewer, larger blocks and fewer loop trips win there)"
    parts.append(f"## Workload profile (weights are shares of production calls)\n" + "\n".join(lines)
                 + f"\nHardware: {hardware}.")

    inc = incumbent_source(op, c)
    who = ("the deployed variant" if c.incumbent.source else
           "the op's baseline Triton kernel" if inc else "the torch reference (no Triton kernel yet)")
    if inc and (ctx.parent is None or ctx.parent.source != inc):
        parts.append(f"## Incumbent: {who}; beat it\n```python\n{trim(inc, SOURCE_CHARS)}\n```")
    elif not inc:
        parts.append(f"## Incumbent: {who}; write the first Triton kernel for this op")
    if ctx.parent is not None:
        parts.append(f"## Parent program {ctx.parent.variant_id}: {_outcome(ctx.parent)}\n"
                     f"```python\n{trim(ctx.parent.source, SOURCE_CHARS)}\n```")
    for p in ctx.inspirations:
        parts.append(f"## Another good program {p.variant_id}: {_outcome(p)}\n"
                     f"```python\n{trim(p.source, SOURCE_CHARS // 2)}\n```")
    if c.hints:
        parts.append("## Hints\n" + "\n".join(f"- {h}" for h in c.hints))
    shown = attempts[-SHOWN_ATTEMPTS:]
    if shown:
        parts.append("## Earlier attempts and what became of them (do not repeat their mistakes)\n"
                     + "\n".join(_attempt_line(a, ctx.programs) for a in shown))
    if ctx.task == "crossover" and ctx.parent is not None and ctx.inspirations:
        task = (f"Combine the strengths of the parent {ctx.parent.variant_id} and "
                f"{ctx.inspirations[0].variant_id} into one faster kernel.")
    elif ctx.parent is not None:
        task = f"Make the parent {ctx.parent.variant_id} faster on this profile, weighted by the weights above."
    else:
        task = "Write a kernel faster than the incumbent on this profile, weighted by the weights above."
    parts.append(f"## Task (round {ctx.round})\n{task}")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def _outcome(p: Program) -> str:
    if p.status == "pending":
        return "not benchmarked yet"
    if p.status != "ok":
        return f"{p.status}: {trim(p.error or '', ERROR_CHARS)}"
    per_shape = ", ".join(f"{t.shape}: {t.speedup:.2f}x ({t.candidate_us:.1f} us)" for t in p.timings)
    return f"correct, {p.weighted_speedup:.2f}x the incumbent it was measured against (per shape {per_shape})"


def _attempt_line(a: Attempt, programs: dict[str, Program]) -> str:
    if a.status == "proposed" and a.variant_id in programs:
        return f"- round {a.round} ({a.model}): program {a.variant_id}: {_outcome(programs[a.variant_id])}"
    detail = f": {trim(a.detail, ERROR_CHARS)}" if a.detail else ""
    return f"- round {a.round} ({a.model}): {a.status}{detail}"
