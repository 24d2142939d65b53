"""`clipdet bench` as a library: run the chosen protocols on labelled pools, write CSV/JSON/Markdown."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..fit.config import DEFAULT_TARGET_FPR, FitConfig
from ..fit.pools import Pool
from .common import Rows, _counts
from .kshot import DEFAULT_KS, kshot_curve, summarise_kshot
from .logo import leave_one_generator_out, summarise_logo
from .parse import parse_heads, parse_ks, parse_seeds
from .record import run_record
from .robustness import robustness, summarise_robustness, view_shift
from .shortcut import format_breakdown, format_shortcut

PROTOCOLS = ("kshot", "logo", "robustness")


def parse_protocols(spec: str | Iterable[str]) -> list[str]:
    """Protocol names from "kshot,logo", "all" or a list, in canonical order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = {str(x).strip().lower() for x in items if str(x).strip()}
    if "all" in names:
        return list(PROTOCOLS)
    unknown = sorted(names - set(PROTOCOLS))
    if unknown or not names:
        raise UsageError(f"--protocol {spec!r}: expected one or more of {', '.join(PROTOCOLS)} or all")
    return [p for p in PROTOCOLS if p in names]


# --------------------------------------------------------------------------- the whole bench


@dataclass
class BenchResult:
    """Rows, summaries and notes of a `run_bench` call, plus its `record` (see `run_record`)."""

    record: dict
    kshot: Rows = field(default_factory=Rows)
    logo: Rows = field(default_factory=Rows)
    robustness: Rows = field(default_factory=Rows)
    shortcut: list[dict] = field(default_factory=list)
    view_shift: list[dict] = field(default_factory=list)
    formats: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # files carrying marks per class (never in a metric)

    def summaries(self) -> dict[str, list[dict]]:
        """Per-protocol summaries (mean and 95% half-width over seeds)."""
        return {"kshot": summarise_kshot(self.kshot), "logo": summarise_logo(self.logo),
                "robustness": summarise_robustness(self.robustness)}


def pool_counts(pool: Pool) -> dict:
    """Image counts: real, fake, and fakes per generator."""
    gens: dict[str, int] = {}
    for g, lab in zip(pool.generator, pool.label):
        if lab == "fake":
            gens[g or "unknown"] = gens.get(g or "unknown", 0) + 1
    n_real, n_fake = _counts(pool)
    return {"real": n_real, "fake": n_fake, "generators": dict(sorted(gens.items()))}


def run_bench(
    pools_by_view: Mapping[str, Pool],
    protocols: str | Sequence[str] = PROTOCOLS,
    heads: str | Sequence[str] = ("svm", "logreg"),
    ks: str | Sequence[int] = DEFAULT_KS,
    seeds: int | Sequence[int] = 5,
    shots: int | None = 10,
    target_fpr: float = DEFAULT_TARGET_FPR,
    per_generator: bool = False,
    formats: Mapping[str, str] | None = None,
    config: Mapping | None = None,
    progress: Callable[[str], None] | None = None,
    params: Mapping[str, dict] | None = None,
    fit_config: FitConfig | None = None,
    text=None,
    provenance: bool = False,
) -> BenchResult:
    """Run the selected protocols on `pools_by_view` ("clean" plus perturbed views for robustness).

    k-shot and leave-one-generator-out use the clean pool; robustness uses every view. `config`
    (e.g. backbone, data paths, command) is stored in the run record with the protocol settings.
    `progress(line)` is called after each protocol (the library itself prints nothing). `params`: head
    name → parameters; `fit_config`: the `FitConfig` every fit starts from (prune, prune_basis).
    `text`: the backbone's `TextEmbedder`, for heads that embed prompts (zeroshot). `provenance`: also
    count the clean pool's files carrying provenance marks per class (read at their recorded paths;
    reported apart, never a feature of any fit or AUC).
    """
    protocols, heads, seeds = parse_protocols(protocols), parse_heads(heads), parse_seeds(seeds)
    ks = parse_ks(ks)
    if "clean" not in pools_by_view:
        raise UsageError(f"run_bench needs the clean view's pool (have: {', '.join(pools_by_view)})")
    clean = pools_by_view["clean"]
    cfg = {**dict(config or {}), "protocols": protocols, "heads": heads, "ks": ks, "seeds": seeds,
           "shots": "all" if shots is None else shots, "target_fpr": target_fpr, "per_generator": per_generator,
           "views": list(pools_by_view)}
    fit_options = ({"prune": fit_config.prune, "prune_basis": fit_config.prune_basis}
                   if fit_config is not None and fit_config.prune else None)
    cfg.update({k: dict(v) for k, v in (("params", params), ("fit_options", fit_options)) if v})
    res = BenchResult(record=run_record(cfg, clean), counts=pool_counts(clean))
    if formats:
        res.formats = format_breakdown(clean, formats)
        tv = res.formats["total_variation"]
        if tv == tv and tv > 0.5:
            res.notes.append(f"real and fake images differ in file format (total variation {tv:.2f}): "
                             "a detector can learn the format instead of the content; see the format-shortcut check")
    if provenance:
        from .trust import pool_provenance, provenance_note

        res.provenance = pool_provenance(clean)
        note = provenance_note(res.provenance)
        if note:
            res.notes.append(note)
    say = progress or (lambda line: None)
    if "kshot" in protocols:
        t0 = time.perf_counter()
        res.kshot = kshot_curve(clean, heads, ks, seeds, target_fpr, per_generator, params, fit_config, text)
        res.seconds["kshot"] = time.perf_counter() - t0
        say(f"k-shot: {len(res.kshot)} fits in {res.seconds['kshot']:.1f} s")
    if "logo" in protocols:
        t0 = time.perf_counter()
        try:
            res.logo = leave_one_generator_out(clean, heads, shots, seeds, target_fpr, per_generator,
                                               params=params, fit_config=fit_config, text=text)
        except UsageError as e:
            res.logo = Rows(notes=[f"logo: skipped: {e}"])
        res.seconds["logo"] = time.perf_counter() - t0
        say(f"leave-one-generator-out: {len(res.logo)} fits in {res.seconds['logo']:.1f} s")
    if "robustness" in protocols:
        t0 = time.perf_counter()
        rob = robustness(pools_by_view, heads, shots, seeds, target_fpr, per_generator=per_generator, params=params,
                         fit_config=fit_config, text=text)
        if len(pools_by_view) < 2:
            rob.notes.insert(0, "robustness: no perturbed view given, so only the clean AUC is measured")
        res.robustness = rob
        res.shortcut = format_shortcut(res.robustness)
        res.view_shift = view_shift(pools_by_view)
        flat = [r["view"] for r in res.view_shift if r["relative_shift"] < 0.01]
        if flat:
            res.notes.append(f"view(s) {', '.join(flat)} move the embeddings by under 1% of the spread between "
                             "images: their robustness numbers cannot differ from clean")
        res.seconds["robustness"] = time.perf_counter() - t0
        say(f"robustness: {len(res.robustness)} rows in {res.seconds['robustness']:.1f} s")
    res.notes += res.kshot.notes + res.logo.notes + res.robustness.notes
    res.record["seconds"] = dict(res.seconds)
    return res


# --------------------------------------------------------------------------- writing


def write_rows_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> str:
    """Rows as CSV (columns in first-seen order; floats written with repr precision, NaN as 'nan')."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    os.replace(tmp, path)
    return str(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def _nan_to_none(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def _fmt_ci(mean: float, half: float, lo: float = 0.0, hi: float = 1.0) -> str:
    """'mean ± half', or 'mean (lo–hi)' with the interval clipped to the metric's range [lo, hi]
    (a t-interval over 2 seeds can reach far outside it)."""
    if mean != mean:
        return "n/a"
    if half != half:
        return f"{mean:.3f}"
    if mean - half < lo or mean + half > hi:
        return f"{mean:.3f} ({max(lo, mean - half):.3f}–{min(hi, mean + half):.3f})"
    return f"{mean:.3f} ± {half:.3f}"


def write_bench(result: BenchResult, directory: str | os.PathLike, title: str = "clipdet bench",
                preamble: str = "") -> dict[str, str]:
    """Write kshot.csv, logo.csv, robustness.csv (one row per fit), *_summary.csv, format_shortcut.csv,
    run.json (run record, counts, summaries, notes) and report.md with PNG plots into `directory`
    (created if needed; only these files are replaced). Returns {name: path} of what was written."""
    from .plots import plot_bars, plot_kshot
    from .report import markdown_table, random_weights_warning, write_markdown_report

    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    files: dict[str, str] = {}
    summ = result.summaries()
    for name in PROTOCOLS:
        rows = getattr(result, name)
        if rows:
            files[f"{name}.csv"] = write_rows_csv(rows, os.path.join(d, f"{name}.csv"))
            files[f"{name}_summary.csv"] = write_rows_csv(summ[name], os.path.join(d, f"{name}_summary.csv"))
    if result.shortcut:
        files["format_shortcut.csv"] = write_rows_csv(result.shortcut, os.path.join(d, "format_shortcut.csv"))

    rec = result.record
    cfg = rec["config"]
    sections: list[tuple] = []
    head_txt = (preamble.rstrip() + "\n\n") if preamble else ""
    c = result.counts
    head_txt += (f"Backbone `{cfg.get('backbone', '?')}`; {c.get('real', 0)} real and {c.get('fake', 0)} fake images "
                 f"({len(c.get('generators', {}))} generators); manifest hash `{rec['manifest_hash'][:16]}…`; "
                 f"seeds {cfg['seeds']}; heads {', '.join(cfg['heads'])}; target FPR {cfg['target_fpr']}.\n\n"
                 "Every row of the CSV files is one detector fitted on references drawn with one seed and tested on "
                 "images that are not references (disjoint by SHA-256). Intervals are 95% t-intervals over seeds. "
                 "Accuracy is at the threshold calibrated on the references alone (none with 1 shot per class: "
                 "threshold 0).")
    sections.append(("Run", head_txt))
    gen_rows = [{"generator": g, "fakes": n} for g, n in c.get("generators", {}).items()]
    data_txt = markdown_table(gen_rows, ["generator", "fakes"]) if gen_rows else ""
    if result.formats:
        data_txt += ("\nFile formats per class (total variation between the real and fake mix: "
                     f"{result.formats['total_variation']:.2f}):\n\n"
                     + markdown_table(result.formats["rows"], ["label", "format", "count", "fraction"]))
    if data_txt:
        sections.append(("Data", data_txt))

    if result.kshot:
        imgs = []
        for metric in ("auc", "balanced_accuracy"):
            fn = f"kshot_{metric}.png"
            plot_kshot(result.kshot, os.path.join(d, fn), metric=metric, title=f"{metric} vs shots per class")
            imgs.append(fn)
        table = [{"head": s["head"], "k": s["k"], "seeds": s["n"], "AUC": _fmt_ci(s["auc_mean"], s["auc_ci95"]),
                  "AP": _fmt_ci(s["ap_mean"], s["ap_ci95"]),
                  "bal. acc": _fmt_ci(s["balanced_accuracy_mean"], s["balanced_accuracy_ci95"]),
                  "TPR@1%FPR": _fmt_ci(s["tpr_at_1pct_fpr_mean"], s["tpr_at_1pct_fpr_ci95"]),
                  "EER": _fmt_ci(s["eer_mean"], s["eer_ci95"])} for s in summ["kshot"]]
        sections.append(("K-shot curve", markdown_table(table), imgs))
    if result.logo:
        imgs = []
        for h in cfg["heads"]:
            vals = {s["generator"]: s["auc_mean"] for s in summ["logo"] if s["head"] == h}
            if vals:
                fn = f"logo_{h}.png"
                n_fake = {r["generator"]: r["n_test_fake"] for r in result.logo
                          if r.get("head") == h and "n_test_fake" in r}
                skipped = sorted({n.split()[2] for n in result.logo.notes if n.startswith("logo: generator ")}
                                 - set(vals))
                plot_bars(vals, os.path.join(d, fn), title=f"{h}: AUC on a held-out generator", chance=0.5,
                          counts=n_fake, excluded=[f"{g} (skipped: see notes)" for g in skipped])
                imgs.append(fn)
        table = [{"head": s["head"], "held out": s["generator"], "seeds": s["n"],
                  "AUC (unseen)": _fmt_ci(s["auc_mean"], s["auc_ci95"]),
                  "AUC (seen gens)": _fmt_ci(s["auc_seen_mean"], s["auc_seen_ci95"]),
                  "TPR@1%FPR": _fmt_ci(s["tpr_at_1pct_fpr_mean"], s["tpr_at_1pct_fpr_ci95"])} for s in summ["logo"]]
        text = (f"Fit on {cfg['shots']} references per class from the reals and the other generators; test on the "
                "remaining reals and every fake of the held-out generator. \"seen gens\": the same detector on the "
                "other generators' non-reference fakes.\n\n" + markdown_table(table))
        sections.append(("Leave one generator out", text, imgs))
    if result.robustness:
        imgs = []
        for h in cfg["heads"]:
            vals = {s["view"]: s["auc_mean"] for s in summ["robustness"] if s["head"] == h and s["fit_view"] == "clean"}
            if vals:
                fn = f"robustness_{h}.png"
                plot_bars(vals, os.path.join(d, fn), title=f"{h}: AUC per view (fit on clean)", chance=0.5)
                imgs.append(fn)
        table = [{"head": s["head"], "fit on": s["fit_view"], "test view": s["view"], "seeds": s["n"],
                  "AUC": _fmt_ci(s["auc_mean"], s["auc_ci95"]), "ΔAUC vs clean": _fmt_ci(s["delta_auc_mean"],
                                                                                          s["delta_auc_ci95"], -1.0),
                  "acc": _fmt_ci(s["accuracy_mean"], s["accuracy_ci95"])} for s in summ["robustness"]]
        text = ("Fit on clean features of the references; test on each view of the same non-reference images "
                "(real and fake perturbed identically). Accuracy uses the clean-calibrated threshold.\n\n"
                + markdown_table(table))
        if result.view_shift:
            text += ("\nHow far each view moves the embeddings (mean L2 shift of an image's embedding; relative: "
                     "divided by the mean distance between clean embeddings and their centroid):\n\n"
                     + markdown_table(result.view_shift, ["view", "n", "mean_shift", "relative_shift"]))
        sections.append(("Robustness", text, imgs))
        if result.shortcut:
            cols = ["head", "view", "n", "auc_clean", "auc_reencoded", "delta", "delta_ci95", "auc_refit",
                    "delta_refit", "verdict"]
            sections.append(("Format-shortcut check",
                             "Every image (real and fake) re-encoded the same way; a large AUC drop means the "
                             "detector used the file format or compression as a cue.\n\n"
                             + markdown_table(result.shortcut, cols)))
    if result.provenance:
        from .trust import provenance_rows

        sections.append(("Provenance marks (not used in any fit or AUC)", "Files carrying C2PA, XMP "
                         "DigitalSourceType, generator PNG text or EXIF Software marks, per class. Missing marks "
                         "prove nothing.\n\n" + markdown_table(provenance_rows(result.provenance),
                                                                ["class", "files", "marked", "ai_marked", "sources"])))
    if result.notes:
        sections.append(("Notes", "\n".join(f"- {n}" for n in result.notes)))
    v = rec["versions"]
    sections.append(("Reproduce", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items())
                     + f"; machine: {rec['machine']['platform']}, {rec['machine']['cpu_count']} CPUs"
                     + (f"; clipdet source commit {rec['source']['git_commit'][:12]}"
                        + (" with uncommitted changes" if rec["source"].get("git_dirty") else "")
                        if rec.get("source") else "") + ".\n\n"
                     "Config and manifest hash: `run.json`."))
    files["report.md"] = str(write_markdown_report(d, title, sections,
                                                   warning=random_weights_warning(cfg.get("backbone_record"))))
    for sec in sections:
        files.update({img: os.path.join(d, img) for img in (sec[2] if len(sec) == 3 else [])})
    run = {**rec, "counts": result.counts, "formats": result.formats, "notes": result.notes,
           "provenance": result.provenance,
           "summaries": summ, "format_shortcut": result.shortcut, "view_shift": result.view_shift,
           "files": sorted(files)}
    tmp = os.path.join(d, ".run.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_nan_to_none(json.loads(json.dumps(run, default=_json_default))), f, indent=1)
    os.replace(tmp, os.path.join(d, "run.json"))
    files["run.json"] = os.path.join(d, "run.json")
    return files
