"""Tables and plots in results/ from run folders (their summary.json files).

    python scripts/make_tables.py                      # reads runs/, writes results/
    python scripts/make_tables.py --runs /cluster/runs --out results

Writes paper_table.md (METHOD.md section 5 beside our runs), converged.md (the converged Fashion-MNIST
study: every claim of the paper with a 95% confidence interval), fmnist.md (the small study), bits.md,
architectures.md (arch_* runs: beyond ResNets) and, unless --no-plots, converged.png, fmnist.png and
bits.png. Every figure is a mean +- sample std over seeds with n and the run folders it comes from.
The same runs give the same tables byte for byte.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# METHOD.md section 5, read off the authors' poster figures (+-0.5 point)
PAPER_ROWS = [
    ("ImageNet ResNet-18, FP32", 65.8, "imagenet_resnet18_fp32"),
    ("ImageNet ResNet-18, 8-bit (W/A/G 8, weight-gradient copy 16, Range BN)", 66.3, "imagenet_resnet18_int8"),
    ("ImageNet ResNet-50, FP32", 72.5, "imagenet_resnet50_fp32"),
    ("ImageNet ResNet-50, 8-bit", 71.6, "imagenet_resnet50_int8"),
    ("ImageNet ResNet-50, Range BN instead of BN (precision not stated)", 72.2, "imagenet_resnet50_rangebn"),
]
FMNIST_ROWS = [
    ("fmnist_fp32", "FP32, standard BN"),
    ("fmnist_int8", "int8 (the paper): W/A/G 8, weight-gradient copy 16, Range BN"),
    ("fmnist_int8_no_bifurcation", "int8, no bifurcation (8-bit weight-gradient copy)"),
    ("fmnist_int8_fp32_wgrad", "int8, float32 weight-gradient copy (reference code)"),
    ("fmnist_int8_batchnorm", "int8 with standard BN (8-bit input and gradient)"),
    ("fmnist_rangebn_fp32", "FP32 with Range BN"),
    ("fmnist_int8_rangebn_paper", "int8, Range BN constant: paper 1/sqrt(2 ln n)"),
    ("fmnist_int8_rangebn_reference", "int8, Range BN constant: reference, 16 chunks"),
]
BITS_SWEEPS = [("bits_grad", "grad_bits", "layer gradients (grad_bits)"),
               ("bits_weight", "weight_bits", "weights (weight_bits)"),
               ("bits_act", "act_bits", "activations (act_bits)")]
CONVERGED_ROWS = [
    ("conv_fp32", "FP32, standard BN"),
    ("conv_int8", "int8 (the paper): W/A/G 8, weight-gradient copy 16, Range BN"),
    ("conv_int8_no_bifurcation", "int8, no bifurcation (8-bit weight-gradient copy)"),
    ("conv_int8_fp32_wgrad", "int8, float32 weight-gradient copy (reference code)"),
    ("conv_int8_batchnorm", "int8 with standard BN (8-bit input and gradient)"),
    ("conv_rangebn_fp32", "FP32 with Range BN"),
    ("conv_int8_rangebn_paper", "int8, Range BN constant: paper 1/sqrt(2 ln n)"),
    ("conv_int8_rangebn_reference", "int8, Range BN constant: reference"),
    ("conv_int8_float_layer_grad", "int8 forward, float layer gradients (diagnosis)"),
    ("conv_int8_batch_range", "int8, activation range from the batch's min/max (diagnosis)"),
    ("conv_bits_grad/grad_bits4", "int8 with 4-bit layer gradients"),
    ("conv_bits_grad/grad_bits6", "int8 with 6-bit layer gradients (per-tensor range: the paper's)"),
    ("conv_grad_range/grad_rangesample", "int8 with 6-bit layer gradients, one range per sample"),
    ("conv_grad_range/grad_rangechannel", "int8 with 6-bit layer gradients, one range per channel"),
    ("conv_grad_range/grad_rangehadamard", "int8 with 6-bit layer gradients, Hadamard-rotated, one range per sample"),
    ("conv_grad_range8/grad_rangesample", "int8, one layer-gradient range per sample (diagnosis)"),
    ("conv_grad_range8/grad_rangehadamard", "int8, Hadamard-rotated layer gradients, one range per sample (diagnosis)"),
]
MARGIN = 0.3  # top-1 points: "as good as" means the 95% interval of the difference lies within +-MARGIN
# (claim, row, baseline, kind): "same" = the paper says no loss; "lower" = the paper says the row loses
# accuracy against its baseline; "differs" = an ablation the paper makes no claim about
CLAIMS = [
    ("8-bit training (W/A/G 8, 16-bit weight-gradient copy, Range BN) matches float32", "int8", "fp32", "same"),
    ("a 16-bit weight-gradient copy matches a float32 one", "int8", "int8_fp32_wgrad", "same"),
    ("gradients bifurcation: an 8-bit weight-gradient copy loses accuracy", "int8_no_bifurcation", "int8", "lower"),
    ("Range BN matches standard BN (float32)", "rangebn_fp32", "fp32", "same"),
    ("at 8 bits, standard BN loses accuracy against Range BN", "int8_batchnorm", "int8", "lower"),
    ("Range BN constant: the paper's 1/sqrt(2 ln n) against the exact one", "int8_rangebn_paper", "int8", "differs"),
    ("Range BN constant: the reference code's against the exact one", "int8_rangebn_reference", "int8", "differs"),
    ("layer gradients: 6 bits match 8 (the poster's flat curve from 6)", "bits_grad/grad_bits6", "int8", "same"),
    ("layer gradients: 4 bits lose accuracy against 8", "bits_grad/grad_bits4", "int8", "lower"),
    ("6-bit layer gradients with one range per sample match 8 bits", "grad_range/grad_rangesample", "int8", "same"),
    ("6-bit layer gradients with one range per channel match 8 bits", "grad_range/grad_rangechannel", "int8", "same"),
    ("6-bit Hadamard-rotated layer gradients match 8 bits", "grad_range/grad_rangehadamard", "int8", "same"),
]
# not the paper's claims: where the paper's int8 loses against float32, if it does
# int8 - float32 splits into what each quantizer costs: a row that removes one of them gains that
# much over int8 (the first line of each pair) and, if it was the whole loss, matches float32 (the second)
DIAGNOSIS = [
    ("float layer gradients, both copies, gain over int8 (what the gradient quantizers cost)", "int8_float_layer_grad", "int8",
     "differs"),
    ("int8 with float layer gradients matches float32", "int8_float_layer_grad", "fp32", "same"),
    ("the batch's min/max as activation range gains over int8 (what clipping activations costs)", "int8_batch_range",
     "int8", "differs"),
    ("int8 with the batch's min/max as activation range matches float32", "int8_batch_range", "fp32", "same"),
    ("8-bit layer gradients with one range per sample gain over int8's per-tensor range", "grad_range8/grad_rangesample",
     "int8", "differs"),
    ("int8 with one layer-gradient range per sample matches float32", "grad_range8/grad_rangesample", "fp32", "same"),
    ("8-bit Hadamard-rotated layer gradients gain over int8's per-tensor range", "grad_range8/grad_rangehadamard", "int8",
     "differs"),
    ("int8 with Hadamard-rotated layer gradients matches float32", "grad_range8/grad_rangehadamard", "fp32", "same"),
]
KINDS = [("activation", "forward: activations"), ("weight", "forward: weights"),
         ("layer_grad", "backward: layer gradients"), ("weight_grad", "backward: weight gradients")]


def load_runs(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        s["_folder"] = path.parent.relative_to(root).as_posix()
        runs.append(s)
    return runs


def stats(values: list) -> str:
    """mean +- sample std (n); runs that diverged (None) are counted, not averaged."""
    if not values:
        return "not run here"
    done = [v for v in values if v is not None]
    diverged = f"{len(values) - len(done)} of {len(values)} diverged" if len(done) < len(values) else ""
    if not done:
        return diverged
    mean = statistics.fmean(done)
    spread = statistics.stdev(done) if len(done) > 1 else 0.0
    return f"{mean:.2f} +- {spread:.2f} (n={len(done)})" + (f"; {diverged}" if diverged else "")


def row_key(run: dict) -> str:
    """A run's row: its folder from the experiment name on, without the seed (e.g.
    conv_bits_grad/grad_bits6), so swept values of one name are rows of their own."""
    parts = run["_folder"].split("/")
    start = parts.index(run["name"]) if run["name"] in parts else len(parts) - 2
    return "/".join(parts[start:-1]) if parts[-1].startswith("seed") else "/".join(parts[start:])


def top1s(runs: list[dict]) -> list[float]:
    return [r["val_top1"] for r in runs if r.get("val_top1") is not None]


def difference_interval(row: list[float], base: list[float], level: float = 0.95) -> tuple[float, float, float, str] | None:
    """(mean difference, low, high, method) of row - base: Welch's t-interval when both sides have 2+
    seeds; with 1 seed on a side, Student's pooled interval (that side's spread taken to be the
    other's); None with 1 seed on each side, or no spread at all (nothing to go on)."""
    from scipy import stats as st

    if len(row) + len(base) < 3 or max(statistics.pvariance(row), statistics.pvariance(base)) == 0:
        return None
    welch = len(row) > 1 and len(base) > 1
    ci = st.ttest_ind(row, base, equal_var=not welch).confidence_interval(level)
    diff = statistics.fmean(row) - statistics.fmean(base)
    return diff, float(ci.low), float(ci.high), "Welch" if welch else "pooled: one side has 1 seed"


def verdict(kind: str, interval: tuple | None, n: tuple[int, int]) -> str:
    unresolved = f"not resolved at n={n[0]}/{n[1]} seeds"
    if interval is None:
        return unresolved
    _, lo, hi, _ = interval
    if kind == "same":
        if -MARGIN <= lo and hi <= MARGIN:
            return f"resolved: the same within {MARGIN}"
        if hi < -MARGIN or lo > MARGIN:
            return f"resolved: differs by more than {MARGIN}"
        if hi < 0 or lo > 0:  # a difference, but not yet one beyond the margin
            return f"resolved: {'lower' if hi < 0 else 'higher'} (the interval excludes 0); within {MARGIN}: {unresolved}"
        return unresolved
    if kind == "lower":
        if hi < 0:
            return "resolved: lower"
        if lo > -MARGIN:
            return f"resolved: no loss beyond {MARGIN}"
        return unresolved
    return "resolved: differs" if hi < 0 or lo > 0 else unresolved


def claims_table(groups: dict[str, list[dict]], prefix: str, claims: list[tuple] = CLAIMS) -> list[str]:
    """Every comparison the paper makes, as row - baseline with its 95% interval and a verdict."""
    lines = ["| claim | row - baseline (top-1 points) | 95% interval | n (row/baseline) | verdict |",
             "|" + " --- |" * 5]
    for claim, row, base, kind in claims:
        a, b = top1s(groups.get(prefix + row, [])), top1s(groups.get(prefix + base, []))
        if not a or not b:
            lines.append(f"| {claim} (`{prefix}{row}` vs `{prefix}{base}`) | not run here | - | {len(a)}/{len(b)} | - |")
            continue
        ci = difference_interval(a, b)
        diff = statistics.fmean(a) - statistics.fmean(b)
        where = f"[{ci[1]:+.2f}, {ci[2]:+.2f}] ({ci[3]})" if ci else "-"
        lines.append(f"| {claim} (`{prefix}{row}` vs `{prefix}{base}`) | {diff:+.2f} | {where} | {len(a)}/{len(b)} | "
                     f"{verdict(kind, ci, (len(a), len(b)))} |")
    return lines


def converged_table(runs: list[dict], source: str) -> str:
    groups = defaultdict(list)
    for r in runs:
        groups[row_key(r)].append(r)
    lines = header(
        "Converged Fashion-MNIST study: the paper's claims with 95% confidence intervals", source,
        "Validation top-1 / top-5 (%) on the 10k test images after the last epoch, mean +- sample std over seeds "
        "(n: seeds; diverged runs counted, not averaged). Cos: each tensor kind of the quantized pass against the "
        "same tensor in a full-precision pass of the same model and batch (shadow cosine, size-weighted over layers, "
        "at each run's last diagnostics; mean over seeds; 1.0: float; \"-\": a float row).",
        ["run", "top-1", "top-5", "activation cos", "layer-gradient cos", "weight-gradient cos",
         "wall time per run (min)", "run folders"],
    )
    for key, label in CONVERGED_ROWS:
        rs = groups.get(key, [])
        wall = f"{statistics.fmean(r['wall_time_s'] for r in rs) / 60:.0f}" if rs else "-"
        lines.append(f"| {label} (`{key}`) | {stats([r['val_top1'] for r in rs])} | "
                     f"{stats([r['val_top5'] for r in rs])} | {last_fidelity(rs, 'activation')} | "
                     f"{last_fidelity(rs, 'layer_grad')} | {last_fidelity(rs, 'weight_grad')} | {wall} | {folders(rs)} |")
    lines += ["", "## The paper's claims", "", CLAIMS_NOTE, ""]
    lines += claims_table(groups, "conv_")
    lines += ["", "## Where int8 loses against float32 (diagnosis, not the paper's claims)", ""]
    lines += claims_table(groups, "conv_", DIAGNOSIS)
    cpu_hours = sum(r["wall_time_s"] * r.get("threads", 1) for r in runs) / 3600
    lines += ["", _provenance(runs), "",
              f"Cost of the runs above: {len(runs)} runs, {cpu_hours:.1f} CPU-hours (wall time x threads, summed over "
              "runs; two runs at a time on a 2-core machine, drawn anew each session, so one row's times vary).", "",
              "Regenerate: `python scripts/sweep.py converged --jobs 2` (resumable), then "
              "`python scripts/make_tables.py --readme README.md`.", ""]
    return "\n".join(lines)


CLAIMS_NOTE = (f"Each claim as a difference of mean top-1 to its baseline with a 95% confidence interval over seeds. "
              f"\"The same\" is resolved when the whole interval lies within +-{MARGIN} points (the study's goal for "
              f"int8 against float32), \"differs\" when it excludes the margin (or zero, for ablations the paper makes "
              f"no claim about); \"lower\" when it lies below zero. Anything else is not resolved at that many seeds.")


def folders(runs: list[dict]) -> str:
    return ", ".join(f"`{r['_folder']}`" for r in runs) or "-"


def by_name(runs: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in runs:
        groups[r["name"]].append(r)
    return groups


def header(title: str, source: str, note: str, columns: list[str] | None = None) -> list[str]:
    """A table file's title, provenance line and (optionally) column header."""
    lines = [f"# {title}", "", f"Generated by `scripts/make_tables.py` from {source}; do not edit. {note}", ""]
    if columns:
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines


def paper_table(runs: list[dict], source: str) -> str:
    groups = by_name(runs)
    lines = header(
        "The paper's ImageNet table beside our runs", source,
        "Paper figures are read from the authors' poster figures, approximate (+-0.5 point). Ours: top-1 on "
        "the validation set after the last epoch, mean +- sample std over seeds.",
        ["experiment", "paper top-1 (read from figure, approx.)", "ours top-1", "run folders"],
    )
    for label, paper, name in PAPER_ROWS:
        rs = groups.get(name, [])
        lines.append(f"| {label} (`experiment={name}`) | {paper:.1f} | {stats([r['val_top1'] for r in rs])} | {folders(rs)} |")
    lines += ["", "Run these with `python scripts/sweep.py imagenet --launcher slurm -- data.root=<imagenet>` on a "
              "GPU cluster, then rerun this script over the run folders.", ""]
    return "\n".join(lines)


def fmnist_table(runs: list[dict], source: str) -> str:
    groups = by_name(runs)
    lines = header(
        "Fashion-MNIST study: FP32 vs the paper's int8 vs ablations", source,
        "Validation top-1 / top-5 (%) on the 10k test images after the last epoch, mean +- sample std over seeds.",
        ["run", "top-1", "top-5", "wall time per run (s)", "run folders"],
    )
    for name, label in FMNIST_ROWS:
        rs = groups.get(name, [])
        wall = f"{statistics.fmean(r['wall_time_s'] for r in rs):.0f}" if rs else "-"
        rs_top5 = [r["val_top5"] for r in rs]
        lines.append(f"| {label} (`{name}`) | {stats([r['val_top1'] for r in rs])} | "
                     f"{stats(rs_top5)} | {wall} | {folders(rs)} |")
    lines += ["", "## The paper's claims at this scale", "", CLAIMS_NOTE, ""]
    lines += claims_table(groups, "fmnist_", [c for c in CLAIMS if not c[1].startswith(("bits_", "grad_range"))])
    lines += ["", _provenance(runs), ""]
    return "\n".join(lines)


ARCH_FIELDS = [("norm", "kind"), ("norm", "chunks"), ("quant", "weight_bits"), ("quant", "act_bits"), ("quant", "grad_bits"),
               ("quant", "grad_weight_bits"), ("quant", "weight_range")]


def _setting(c: dict) -> str:
    """What a run quantizes, from its saved config."""
    q, n = c["quant"], c["norm"]
    if all(q[k] is None for k in ("weight_bits", "act_bits", "grad_bits", "grad_weight_bits")):
        return f"float32, {'Range BN' if n['kind'] == 'range' else 'BN'}"
    bits = "/".join("f" if q[k] is None else str(q[k]) for k in ("weight_bits", "act_bits", "grad_bits", "grad_weight_bits"))
    norm = f"Range BN, {n['chunks']} chunk{'s' if n['chunks'] > 1 else ''}" if n["kind"] == "range" else "BN"
    extra = ", per-channel weights" if q["weight_range"] == "channel" else ""
    extra += ", per-channel activation ranges where channels stay apart" if q.get("act_range") == "channel" else ""
    extra += ", activation ranges from the batch's min/max" if q.get("act_estimator") == "batch" else ""
    extra += f", one layer-gradient range per {q['grad_range']}" if q.get("grad_range", "tensor") != "tensor" else ""
    if q.get("overrides"):  # per-layer changes: say which fields, for how many name patterns
        fields = sorted({f"{k}={v}" for change in q["overrides"].values() if isinstance(change, dict) for k, v in change.items()})
        extra += f", overrides on {len(q['overrides'])} layer patterns ({', '.join(fields) or 'float'})"
    return f"W/A/G/Gw {bits}, {norm}{extra}"


# results/architectures.md's main table: family -> its float32, paper int8 and int8_batch_range rows
ARCH_FAMILIES = [
    ("MobileNetV2 (width 0.5)", "arch_mobilenet_v2_fp32", "arch_mobilenet_v2_int8_chunks16", "arch_mobilenet_v2_int8_batch_range"),
    ("ResNet-20 (width 8)", "arch_resnet20_fp32", "arch_resnet20_int8", "arch_resnet20_int8_batch_range"),
    ("ShuffleNetV2 (width 0.5)", "arch_shufflenet_v2_fp32", "arch_shufflenet_v2_int8", "arch_shufflenet_v2_int8_batch_range"),
    ("ViT (4 layers, width 64)", "arch_vit_w64_fp32", "arch_vit_w64_int8", "arch_vit_w64_int8_batch_range"),
    ("LSTM over rows (128 units)", "arch_row_lstm_fp32", "arch_row_lstm_int8", "arch_row_lstm_int8_batch_range"),
]
IMPROVED_TARGET = 1.0  # issue 11: int8_batch_range within 1 top-1 point of float32 (mean of 3 seeds)


def arch_families_table(groups: dict[str, list[dict]]) -> list[str]:
    """Per family: float32, the paper's int8 and int8_batch_range (mean +- std, diverged runs
    counted), and each int8 setting's difference to float32 with its 95% interval."""
    lines = ["| family | float32 | int8 (the paper) | int8_batch_range | paper - float32 (95% interval) | "
             "int8_batch_range - float32 (95% interval) |", "|" + " --- |" * 6]
    for family, *names in ARCH_FAMILIES:
        cells = [stats([r["val_top1"] for r in groups.get(n, [])]) for n in names]
        base = top1s(groups.get(names[0], []))
        diffs = []
        for n in names[1:]:
            rs = groups.get(n, [])
            row = top1s(rs)
            failed = len(rs) - len(row)
            if not row or not base:
                diffs.append(f"{failed} of {len(rs)} diverged" if failed else "-")
                continue
            ci = difference_interval(row, base)
            mean = statistics.fmean(row) - statistics.fmean(base)
            text = f"{mean:+.2f}" + (f" [{ci[1]:+.2f}, {ci[2]:+.2f}]" if ci else "") + f" (n={len(row)}/{len(base)})"
            diffs.append(text + (f"; {failed} diverged" if failed else ""))
        lines.append(f"| {family} | " + " | ".join(cells + diffs) + " |")
    return lines


def diagnostics_table(runs: list[dict]) -> list[str]:
    """The diag_* runs' histories side by side: per diagnostics step, each run's training loss and
    gradient norm (the nearest logged step), the share of conv inputs its activation quantizer
    clips and the activations' shadow cosine."""
    runs = sorted(runs, key=lambda r: r["name"])
    if not runs:
        return []
    cols = []
    for r in runs:
        cols += [f"{r['name']} loss", "grad norm", "clipped (%)", "activation cos"]
    lines = ["| step | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    steps = sorted({f["step"] for r in runs for f in r.get("history", {}).get("fidelity", [])})
    for step in steps:
        cells = []
        for r in runs:
            h = r.get("history", {})
            fid = next((f for f in h.get("fidelity", []) if f["step"] == step), None)
            train = [t for t in h.get("train", []) if t["step"] <= max(step, 1)]
            t = train[-1] if train else None
            act = (fid or {}).get("activation", {})
            cells += [f"{t['loss']:.3f}" if t else "-",
                      f"{t['grad_norm']:.1f}" if t and t["grad_norm"] is not None else "-",
                      f"{100 * act['clipped']:.2f}" if "clipped" in act else "-",
                      f"{act['shadow_cosine']:.3f}" if "shadow_cosine" in act else "-"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def last_fidelity(runs: list[dict], kind: str, key: str = "shadow_cosine", scale: float = 1.0) -> str:
    """The mean over runs of one tensor kind's value at each run's last diagnostics ("-": none recorded)."""
    v = [f[kind][key] * scale for f in (r.get("fidelity") or {} for r in runs) if kind in f and key in f[kind]]
    return f"{statistics.fmean(v):.3f}" if v else "-"


def arch_table(runs: list[dict], source: str, diagnostics: list[dict] = ()) -> str:
    """The families table, the diagnostics of diag_* runs, then every arch_* run: the model, what it quantizes, top-1 (diverged
    runs counted), and the last diagnostics' size-weighted shadow cosine (the quantized pass
    against a full-precision pass)."""
    groups = by_name(runs)
    lines = header(
        "Beyond ResNets: float32 vs the paper's int8 vs int8_batch_range", source,
        "Validation top-1 (%) on the 10k test images after the last epoch, mean +- sample std over seeds (n); "
        "diverged runs are counted, not averaged. int8_batch_range is the paper's int8 with activation ranges "
        "from the batch's min and max instead of the mean over samples of each sample's min and max "
        "(docs/METHOD.md); the learning rate is the float32 recipe's for every row. Differences to float32 with "
        "a 95% interval (Welch; pooled when one side has one seed).")
    lines += arch_families_table(groups)
    lines += ["", "![architectures.png](architectures.png)", ""]
    diag = diagnostics_table([r for r in diagnostics if r.get("history")])
    if diag:
        lines += ["## How the paper's int8 fails on MobileNetV2", "",
                  "Seed 0 of both int8 rows again, with the loss and gradient norm logged every 5 steps and the "
                  "diagnostics every 10 (`python scripts/sweep.py arch_diagnostics --jobs 2`; history in each run's "
                  "summary.json). Clipped: the share of the convolutions' inputs outside their activation quantizer's "
                  "range (size-weighted over layers); activation cos: the quantized pass's convolution inputs against "
                  "a full-precision pass of the same model and batch.", ""] + diag + [""]
    lines += ["## Every run, with what it quantizes", ""]
    columns = ["run", "model", "setting", "top-1", "activation cos", "layer-gradient cos", "weight-gradient cos",
               "activations clipped (%)", "run folders"]
    lines += ["The rows above and the search that led to int8_batch_range. Shadow cosine: each tensor kind of the "
              "quantized pass against the same tensor in a full-precision pass of the same model and batch, "
              "size-weighted over layers, at the last diagnostics step (1.0: float); activations clipped: the share of "
              "the convolutions' inputs outside their quantizer's range there (runs since the figure was added).", "",
              "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name in sorted(groups):
        rs = groups[name]
        c = rs[0]["config"]
        model = f"{c['model']['name']} {c['model']['kwargs']}"
        lines.append(f"| `{name}` | {model} | {_setting(c)} | {stats([r['val_top1'] for r in rs])} | "
                     f"{last_fidelity(rs, 'activation')} | {last_fidelity(rs, 'layer_grad')} | "
                     f"{last_fidelity(rs, 'weight_grad')} | {last_fidelity(rs, 'activation', 'clipped', 100)} | {folders(rs)} |")
    lines += ["", _provenance(runs), ""]
    return "\n".join(lines)


def _provenance(runs: list[dict]) -> str:
    if not runs:
        return "No runs found."
    r = runs[0]
    c = r["config"]
    return (
        f"Recipe (from the runs' saved config): model {c['model']['name']} {c['model']['kwargs']}, "
        f"{c['data']['train_subset'] or 'all'} training images, batch {c['data']['batch_size']}, "
        f"{c['trainer']['epochs']} epochs, schedule {c['schedule']['name']} (warm-up {c['schedule']['warmup_epochs']} epoch), "
        f"SGD lr {c['optim']['lr']} momentum {c['optim']['momentum']} weight decay {c['optim']['weight_decay']}. "
        f"Machine: {r['machine']['processor'] or r['machine']['platform']}, {r['threads']} thread(s) per run; "
        f"torch {r['versions']['torch']}; {_commits(runs)}."
    )


def _versions(run: dict) -> list[str]:
    """Each code version that trained a run: its commit (10 digits), "+changes" when tracked files
    differed from it. Runs from before summaries kept every version name only the finishing one."""
    code = run.get("code") or [{"commit": run.get("git_commit"), "dirty": False}]
    names = [f"{str(v['commit'])[:10]}{'+changes' if v.get('dirty') else ''}" if v.get("commit") else "not recorded"
             for v in code]
    return list(dict.fromkeys(names))


def _commits(runs: list[dict]) -> str:
    """The code the runs ran: one commit, or each commit with the runs that used it (a resumed run
    under each of its commits)."""
    by_commit = defaultdict(list)
    for r in runs:
        for name in _versions(r):
            by_commit[name].append(r)
    if len(by_commit) == 1:
        return f"commit {next(iter(by_commit))}"
    return "commits " + ", ".join(f"{c} ({len(rs)} run{'s' * (len(rs) > 1)}: {', '.join(sorted({row_key(r) for r in rs}))})"
                                  for c, rs in sorted(by_commit.items(), key=lambda kv: -len(kv[1])))


def bits_rows(runs: list[dict], name: str, key: str) -> list[tuple[int, list[dict]]]:
    groups = defaultdict(list)
    for r in runs:
        if r["name"] == name:
            groups[r["config"]["quant"][key]].append(r)
    return sorted(groups.items())


def bits_table(runs: list[dict], source: str) -> str:
    lines = header(
        "Bit-width study (the poster's figure)", source,
        "The paper's int8 setting with one bit-width changed. Cosine: the quantized tensor against its "
        "full-precision version (`local`, size-weighted mean over layers) at the last diagnostics step; "
        "METHOD.md section 4's Gaussian lower bound 2^M / (2^M + sqrt(ln N) / sqrt(6)) is shown for N = 10^5.",
    )
    for name, key, label in BITS_SWEEPS:
        rows = bits_rows(runs, name, key)
        lines += [f"## {label}", "", "| M | top-1 | " + " | ".join(f"cos {k}" for k, _ in KINDS) + " | bound (N=1e5) | run folders |",
                  "|" + " --- |" * (len(KINDS) + 4)]
        for bits, rs in rows:
            cos = []
            for kind, _ in KINDS:
                vals = [r["fidelity"][kind]["cosine"] for r in rs if kind in r.get("fidelity", {})]
                cos.append(f"{statistics.fmean(vals):.4f}" if vals else "-")
            lines.append(f"| {bits} | {stats([r['val_top1'] for r in rs])} | " + " | ".join(cos)
                         + f" | {bound(bits, 10**5):.4f} | {folders(rs)} |")
        if not rows:
            lines.append("| - | not run here |" + " - |" * (len(KINDS) + 2))
        lines.append("")
    return "\n".join(lines)


def bound(bits: int, n: int) -> float:
    return 2**bits / (2**bits + math.sqrt(math.log(n)) / math.sqrt(6))


def arch_plot(runs: list[dict], out: Path, plt, meta: dict) -> None:
    """Grouped points per family: float32, the paper's int8, int8_batch_range; mean and sample std,
    every seed drawn; a diverged run drawn at 10 (chance)."""
    groups = by_name(runs)
    if not any(groups.get(n) for _, *names in ARCH_FAMILIES for n in names):
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = ["float32", "int8 (the paper)", "int8_batch_range"]
    for j, (label, color) in enumerate(zip(labels, ("tab:gray", "tab:red", "tab:blue"))):
        for i, (_, *names) in enumerate(ARCH_FAMILIES):
            rs = groups.get(names[j], [])
            xs = i + (j - 1) * 0.25
            vals = [r["val_top1"] if r.get("val_top1") is not None else 10.0 for r in rs]
            if vals:
                ax.scatter([xs] * len(vals), vals, color=color, alpha=0.4, s=14)
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                ax.errorbar([xs], [statistics.fmean(vals)], yerr=[sd], fmt="o", color=color, capsize=4,
                            label=label if i == 0 else None)
    ax.set_xticks(range(len(ARCH_FAMILIES)), [f for f, *_ in ARCH_FAMILIES])
    ax.set_ylabel("validation top-1 (%): mean +- std, each seed")
    ax.set_title("Fashion-MNIST, 2 epochs on 8k images, float32 recipe's learning rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "architectures.png", dpi=100, metadata=meta)
    plt.close(fig)


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of its t-interval); half-width 0 for a single seed."""
    from scipy import stats as st

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, float(st.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def converged_plot(runs: list[dict], out: Path, plt, meta: dict) -> None:
    """Every row with its 95% interval of the mean, and top-1 against layer-gradient bits."""
    groups = defaultdict(list)
    for r in runs:
        groups[row_key(r)].append(r)
    present = [(k, lab) for k, lab in CONVERGED_ROWS if top1s(groups.get(k, []))]
    if not present:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    mi = [mean_interval(top1s(groups[k])) for k, _ in present]
    a1.errorbar([m for m, _ in mi], range(len(present)), xerr=[h for _, h in mi], fmt="o", capsize=3)
    a1.set_yticks(range(len(present)), [f"{k.removeprefix('conv_')} (n={len(top1s(groups[k]))})" for k, _ in present], fontsize=8)
    a1.invert_yaxis()
    a1.set_xlabel("validation top-1 (%), mean and 95% interval over seeds")
    a1.set_title("converged Fashion-MNIST, ResNet-20")
    base = top1s(groups.get("conv_int8", []))
    curves = [("per tensor (the paper)", [(4, "conv_bits_grad/grad_bits4"), (6, "conv_bits_grad/grad_bits6"), (8, "conv_int8")]),
              ("per sample", [(6, "conv_grad_range/grad_rangesample"), (8, "conv_grad_range8/grad_rangesample")]),
              ("per channel", [(6, "conv_grad_range/grad_rangechannel")]),
              ("rotated, per sample", [(6, "conv_grad_range/grad_rangehadamard"), (8, "conv_grad_range8/grad_rangehadamard")])]
    for label, pts in curves:
        pts = [(b, mean_interval(top1s(groups[k]))) for b, k in pts if top1s(groups.get(k, []))]
        if pts:
            a2.errorbar([b for b, _ in pts], [m for _, (m, _) in pts], yerr=[h for _, (_, h) in pts], fmt="o-", capsize=3, label=label)
    if fp32 := top1s(groups.get("conv_fp32", [])):
        a2.axhline(statistics.fmean(fp32), color="k", ls="--", label="float32")
    if base or fp32:
        a2.set_xlabel("layer-gradient bits (weights, activations 8)")
        a2.set_ylabel("validation top-1 (%)")
        a2.set_title("gradient bits and range estimator")
        a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "converged.png", dpi=100, metadata=meta)
    plt.close(fig)


def plots(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = {"Software": None}  # no version stamp: same runs, same file
    converged_plot([r for r in runs if r["name"].startswith("conv_")], out, plt, meta)
    arch_plot([r for r in runs if r["name"].startswith("arch_")], out, plt, meta)
    groups = by_name(runs)
    present = [(n, lab) for n, lab in FMNIST_ROWS if groups.get(n)]
    if present:
        fig, ax = plt.subplots(figsize=(8, 4))
        done = {n: [r["val_top1"] for r in groups[n] if r["val_top1"] is not None] for n, _ in present}
        present = [(n, lab) for n, lab in present if done[n]]
        means = [statistics.fmean(done[n]) for n, _ in present]
        errs = [statistics.stdev(done[n]) if len(done[n]) > 1 else 0 for n, _ in present]
        ax.barh(range(len(present)), means, xerr=errs, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(present)), [n.removeprefix("fmnist_") for n, _ in present])
        ax.set_xlim(min(means) - 3, max(means) + 1.5)
        ax.set_xlabel("validation top-1 (%), mean +- std over seeds")
        ax.set_title("Fashion-MNIST: FP32 vs int8 vs ablations")
        fig.tight_layout()
        fig.savefig(out / "fmnist.png", dpi=100, metadata=meta)
        plt.close(fig)
    sweeps = [(label, key, bits_rows(runs, name, key)) for name, key, label in BITS_SWEEPS]
    if any(rows for _, _, rows in sweeps):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for label, key, rows in sweeps:
            pts = [(b, mean_interval(done)) for b, rs in rows if (done := top1s(rs))]
            if pts:
                a1.errorbar([b for b, _ in pts], [m for _, (m, _) in pts], yerr=[h for _, (_, h) in pts], fmt="o-", capsize=3, label=label)
        a1.set_xlabel("bits M")
        a1.set_ylabel("validation top-1 (%), 95% interval where n > 1")
        a1.legend()
        a1.set_title("accuracy vs bit-width")
        for kind, label in KINDS:
            pts = [(b, statistics.fmean(r["fidelity"][kind]["cosine"] for r in rs)) for b, rs in sweeps[0][2]
                   if all(kind in r.get("fidelity", {}) for r in rs)]
            if pts:
                a2.plot(*zip(*pts), "o-", label=label)
        ms = list(range(2, 17))
        a2.plot(ms, [bound(m, 10**5) for m in ms], "k--", label="Gaussian bound, N=1e5")
        a2.set_xlabel("gradient bits M (weights, activations 8)")
        a2.set_ylabel("cosine(quantized, full precision)")
        a2.set_title("direction kept per tensor kind")
        a2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "bits.png", dpi=100, metadata=meta)
        plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder searched for summary.json")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--readme", type=Path, help="also copy the tables into this README's results section")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    source = f"`{args.runs.resolve().relative_to(ROOT).as_posix() if args.runs.resolve().is_relative_to(ROOT) else args.runs.name}/`"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_table.md").write_text(paper_table(runs, source))
    (args.out / "converged.md").write_text(converged_table([r for r in runs if r["name"].startswith("conv_")], source))
    (args.out / "fmnist.md").write_text(fmnist_table([r for r in runs if r["name"].startswith("fmnist_")], source))
    (args.out / "bits.md").write_text(bits_table(runs, source))
    (args.out / "architectures.md").write_text(arch_table([r for r in runs if r["name"].startswith("arch_")], source,
                                                          [r for r in runs if r["name"].startswith("diag_")]))
    if not args.no_plots:
        plots(runs, args.out)
    if args.readme:
        update_readme(args.readme, args.out)
    print(f"{len(runs)} runs -> {args.out}")


START, END = "<!-- results:start (scripts/make_tables.py --readme) -->", "<!-- results:end -->"


def update_readme(readme: Path, out: Path) -> None:
    """Copy the generated tables (and plots) into README.md between the results markers."""
    rel = out.resolve().relative_to(readme.resolve().parent).as_posix()
    parts = []
    for name, image in (("converged.md", "converged.png"), ("fmnist.md", "fmnist.png"), ("bits.md", "bits.png"), ("paper_table.md", None)):
        text = (out / name).read_text().replace("\n## ", "\n#### ")
        text = text.replace("# ", "### ", 1)
        parts.append(text.strip())
        if image and (out / image).exists():
            parts.append(f"![{image}]({rel}/{image})")
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{readme} has no results markers: {START} ... {END}")
    head, rest = body.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + START + "\n" + "\n\n".join(parts) + "\n" + END + tail)


if __name__ == "__main__":
    main()
