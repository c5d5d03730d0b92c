"""The evaluation gate before deployment (seed 004 "Overall ML System Design"): a candidate model is
promoted only if, on every gated metric, it is not worse than the deployed model beyond a tolerance."""
from __future__ import annotations

import dataclasses

# direction of each metric the evaluation step reports: +1 higher is better, -1 lower is better
DIRECTIONS = {
    "nll_true": -1, "margin": +1, "frac_true_better": +1,      # caption test (ar / masked / diffusion)
    "psnr": +1, "ssim": +1, "codebook_usage": +1,               # tokenizer reconstruction
    "fd": -1, "kid": -1, "clipscore": +1, "r_precision": +1,    # samples for held-out captions
}


@dataclasses.dataclass
class Decision:
    promote: bool
    reasons: list[str]               # why (every metric's verdict, worst first when rejected)
    compared: dict[str, dict]        # metric -> {"candidate", "deployed", "tolerance", "worse_by", "ok"}


def gate(candidate: dict[str, float], deployed: dict[str, float] | None, tolerances: dict[str, float],
         intervals: dict[str, list[float]] | None = None) -> Decision:
    """`tolerances`: metric -> how much worse (in the metric's own units) the candidate may be. Every
    gated metric must be in both reports; nothing deployed yet promotes the candidate. `intervals`: metric ->
    [lo, hi], a confidence interval of worse_by (eval/bootstrap.py); a metric with one fails only when even
    its lower end is beyond the tolerance (worse beyond noise), one without compares the point estimate."""
    intervals = intervals or {}
    unknown = sorted(set(tolerances) - set(DIRECTIONS))
    if unknown:
        raise ValueError(f"gate tolerances {unknown}: unknown metrics; known: {sorted(DIRECTIONS)}")
    if not tolerances:
        raise ValueError("gate: no tolerances given, so nothing would be checked")
    if deployed is None:
        return Decision(True, ["nothing is deployed yet: the first candidate is promoted"], {})
    compared, bad, good = {}, [], []
    for name, tol in sorted(tolerances.items()):
        for who, report in (("candidate", candidate), ("deployed", deployed)):
            if name not in report:
                raise ValueError(f"gate: metric {name!r} missing from the {who} report ({sorted(report)})")
        worse_by = DIRECTIONS[name] * (deployed[name] - candidate[name])  # > 0: the candidate is worse
        ci = intervals.get(name)
        ok = (ci[0] if ci else worse_by) <= tol
        compared[name] = {"candidate": candidate[name], "deployed": deployed[name], "tolerance": tol,
                          "worse_by": worse_by, "ok": ok, **({"interval": list(ci)} if ci else {})}
        noise = f", 95% CI of worse_by [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
        line = (f"{name}: candidate {candidate[name]:.5g} vs deployed {deployed[name]:.5g} "
                f"({'worse' if worse_by > 0 else 'not worse'} by {abs(worse_by):.4g}{noise}; tolerance {tol:.4g})")
        (good if ok else bad).append(((ci[0] if ci else worse_by) - tol, line))
    reasons = [line for _, line in sorted(bad, reverse=True)] + [line for _, line in good]
    return Decision(not bad, reasons, compared)
