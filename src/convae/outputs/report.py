"""``report.html``: one self-contained page per run folder (images inlined), for a person to read."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..models.reference import CIFAR10, LECTURE
from ..utils.errors import ConvaeError, clip, first_line
from ..utils.files import atomic_write_text, read_file
from ..utils.knobs import group_fields
from ..utils.records import loss_terms
from .sweep_tables import budget_heading, capped_note

# ----------------------------------------------------------------------------- the page's parts: style, figures,
# tables, and the run folder's files read as untrusted (a file may be truncated, edited, or planted as a link)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1320px; padding: 0 1.5em; color: #222;
       line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
figure { display: inline-block; margin: .4em 1em .4em 0; vertical-align: top; max-width: 100%; }
figure img { width: 600px; max-width: 100%; border: 1px solid #eee; } figcaption { font-size: .85em; color: #555; }
figure.small img { width: 400px; } figure.native img { width: auto; }
.warn { background: #fff4d6; border-left: 4px solid #e0a800; padding: .4em .8em; }
.note { color: #555; font-size: .9em; } .big { font-size: 1.3em; font-weight: 600; }
"""


def img(path: Path, caption: str, size: str = "") -> str:
    """An inlined figure; ``size`` is "small" (kernel grids), "" (600 px) or "native" (drawn at its own
    size, never scaled down: many small numbers or thumbnails)."""
    if not path.is_file():
        return ""
    data = base64.b64encode(read_file(path, path.parent.parent)).decode()  # never through a link
    return (
        f'<figure class="{size}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def table(headers: list[str], rows: list[list], table_id: str = "", left: int = 1, text: tuple[int, ...] = ()) -> str:
    """Numbers right-aligned; the first ``left`` columns and the ``text`` columns left-aligned."""
    attr = f' id="{table_id}"' if table_id else ""
    cls = lambda i: "l" if i < left or i in text else ""
    head = "".join(f'<th class="{cls(i)}">{html.escape(str(h))}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls(i)}">{html.escape(str(c))}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f} %"


def read_json(path: Path) -> dict | None:
    """A run-folder JSON file (untrusted: it may be truncated, edited or from another tool)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(read_file(path).decode("utf-8"))
    except (ValueError, OSError) as e:
        raise ConvaeError(f"{path} is not readable JSON ({clip(first_line(e), 80)})") from None
    if not isinstance(data, dict):
        raise ConvaeError(f"{path} is not a convae file (it holds a {type(data).__name__}, not a mapping)")
    return data


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(read_file(path).decode("utf-8", "replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            raise ConvaeError(f"{path} line {n} is not JSON (a damaged metrics file)") from None
        if row is not None:
            if not isinstance(row, dict):
                raise ConvaeError(f"{path} line {n} is not a metrics record")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the report

SHORT_RUN_STEPS = 200  # fewer pretraining steps than this: the figures show an early stage
PRETRAIN_KEYS = set(group_fields(Config, "pretrain"))  # the pretraining recipe: its epochs and objective
# what makes a run the lecture's, so that its figures stand beside it
LECTURE_SETTING = {
    "preset": "seed",
    "pretrain_epochs": 5,
    "finetune_epochs": 5,
    "batch_size": 2000,
    "lr": 1e-3,
    "labels_per_class": None,
    "channels": [64, 128, 128],
    "latent_dim": 1024,
    "height": 32,
    "width": 32,
    "in_channels": 3,
    "init": "pretrained",
}


def _lecture_setting(cfg: dict, results: dict | None) -> bool:
    return (
        bool(results)
        and results.get("classes") == CIFAR10
        and results.get("num_images", 0) >= 5000
        and all(cfg.get(k) == v for k, v in LECTURE_SETTING.items())
    )


def _provenance(p: dict | None) -> str:
    if not isinstance(p, dict):
        return ""
    return (
        f'<p class="note">convae {html.escape(str(p.get("convae")))}, torch {html.escape(str(p.get("torch")))}, '
        f"{html.escape(str(p.get('date')))}; {html.escape(str(p.get('device')))} "
        f"({html.escape(str(p.get('device_name')))}), precision {html.escape(str(p.get('precision')))}.</p>"
    )


@dataclass
class _Run:
    """The files of a run folder that the page is made from (each untrusted)."""

    fig: Path  # the figures folder
    cfg: dict
    results: dict | None
    sweep: dict | None
    metrics: list[dict]

    @property
    def summary(self) -> dict:
        return self.results or self.sweep or {}

    @property
    def set_name(self) -> str:
        return str(self.summary.get("eval_label") or "evaluation set")

    @property
    def pretrained_here(self) -> bool:
        return any(m.get("phase") == "pretrain" for m in self.metrics)


def build_report(run: Path) -> str:
    """The page's HTML for the run folder ``run``."""
    r = _Run(
        run / "figures",
        read_json(run / "config.json") or {},
        read_json(run / "results.json"),
        read_json(run / "sweep.json"),
        read_metrics(run / "metrics.jsonl"),
    )
    is_lecture = _lecture_setting(r.cfg, r.results)
    parts = [
        f"<h1>convae report: {html.escape(run.name)}</h1>",
        _provenance(r.summary.get("provenance")),
        *_header(r, is_lecture),
        *_training(r, is_lecture),
        *_kernels(r),
        *_per_class(r, is_lecture),
        *_representation(r),
        *_sweep(r),
        *_config(r),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>convae report: {html.escape(run.name)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(p for p in parts if p)
        + "</body></html>\n"
    )


def _header(r: _Run, is_lecture: bool) -> list[str]:
    parts = []
    classes = r.summary.get("classes", [])
    if classes == CIFAR10 and not is_lecture and r.cfg.get("preset") == "seed":
        parts.append(
            '<p class="note">The lecture\'s figures are not shown beside this run: its setting differs '
            "from the lecture's (the seed recipe, 5 + 5 epochs, on the full CIFAR-10 training split).</p>"
        )
    steps = sum(m.get("images_per_s", 0) * m.get("seconds", 0) for m in r.metrics if m.get("phase") == "pretrain")
    steps = steps / max(int(r.cfg.get("batch_size") or 1), 1)
    if r.pretrained_here and math.isfinite(steps) and steps < SHORT_RUN_STEPS:
        parts.append(
            f'<p class="warn">Pretraining ran about {round(steps)} optimizer step(s), fewer than {SHORT_RUN_STEPS}: '
            "the reconstructions and kernels below show an early stage of learning (typically flat, blurred "
            "reconstructions); more epochs (the <code>long</code> preset) show more.</p>"
        )
    summary = [f"Data: <code>{html.escape(str(r.cfg.get('data', '')))}</code>."]
    results = r.results
    if results and "per_class" in results:
        summary.append(
            f"Evaluated on the {html.escape(results.get('eval_set', ''))}: "
            f'<span class="big">{pct(results["accuracy"])}</span> accuracy over '
            f"{html.escape(str(results['num_images']))} images, {len(classes)} classes."
        )
        t = results.get("timing", {})
        if t:
            summary.append(
                "Wall time: "
                + ", ".join(f"{html.escape(str(k).replace('_s', ''))} {float(v):.1f} s" for k, v in t.items())
                + "."
            )
    parts.append("<p>" + " ".join(summary) + "</p>")
    return parts


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


MAX_TERMS = 8  # named loss terms the training table shows


def _training(r: _Run, is_lecture: bool) -> list[str]:
    train_rows = [m for m in r.metrics if m.get("phase") in ("pretrain", "finetune")]
    if not train_rows:
        return []
    # every named term a run has (a file is untrusted: a few, their names clipped)
    names = list(dict.fromkeys(k for m in train_rows for k in loss_terms(m)))[:MAX_TERMS]
    headers = [
        "phase",
        "epoch",
        "train loss",
        *(clip(n, 40) for n in names),
        "val loss",
        "val accuracy",
        "seconds",
        "images/s",
    ]
    if is_lecture:
        headers.append("lecture (test accuracy)")
    rows = []
    for m in train_rows:
        terms = [_num(m.get(f"train_{n}")) for n in names]
        row = [
            m["phase"],
            m["epoch"],
            f"{m['train_loss']:.4f}",
            *terms,
            f"{m.get('val_loss', float('nan')):.4f}",
            pct(m.get("val_accuracy")),
            f"{m['seconds']:.1f}",
            f"{m['images_per_s']:.0f}",
        ]
        if is_lecture:
            ref = LECTURE["finetune_accuracy"]
            row.append(f"{ref[m['epoch'] - 1]:.2f} %" if m["phase"] == "finetune" and m["epoch"] <= len(ref) else "")
        rows.append(row)
    return [
        "<h2>Training</h2>",
        table(headers, rows, "epochs", left=1),
        '<p class="note">Losses are means over all training images (the lecture divided by 60000).'
        " Accuracy is a fraction of the evaluation set; seconds are training time of the epoch.</p>",
        img(r.fig / "pretrain_loss.png", "pretraining loss (per pixel)")
        + img(r.fig / "finetune_loss.png", "fine-tuning loss (cross-entropy)")
        + img(r.fig / "finetune_accuracy.png", f"accuracy on the {r.set_name} per fine-tuning epoch"),
    ]


KERNEL_FIGURES = [
    ("kernels_initial.png", "initial (random)"),
    ("kernels_pretrained.png", "after pretraining"),
    ("kernels_pretrain_delta.png", "change in pretraining"),
    ("kernels_finetuned.png", "after fine-tuning"),
    ("kernels_finetune_delta.png", "change in fine-tuning"),
]


def _kernels(r: _Run) -> list[str]:
    parts = []
    if any((r.fig / f).is_file() for f, _ in KERNEL_FIGURES):
        shape = r.summary.get("kernel_shape")
        if isinstance(shape, list) and len(shape) == 4 and all(isinstance(v, int) for v in shape):
            what = f"{shape[0]} kernels of {shape[2]}×{shape[3]} {'RGB' if shape[1] == 3 else 'grey'}"
        else:  # a run folder from before the shape was recorded
            what = "The first layer's kernels"
        parts.append(
            f'<h2>First-layer kernels</h2><p class="note">{what}, magnitude |w| '
            "scaled by each grid's maximum, as the lecture shows them.</p>"
        )
        parts.append("".join(img(r.fig / f, c, "small") for f, c in KERNEL_FIGURES))
    if (r.fig / "reconstructions.png").is_file():
        parts.append(
            "<h2>Reconstructions</h2>"
            + img(
                r.fig / "reconstructions.png",
                f"images of the {r.set_name} "
                "(top) over the network's input where the objective "
                "corrupts it, and its output",
                "native",
            )
        )
    return parts


def _per_class(r: _Run, is_lecture: bool) -> list[str]:
    results = r.results
    if not (results and "per_class" in results):
        return []
    headers = ["class", "correct", "total", "accuracy"] + (["lecture (test)"] if is_lecture else [])
    rows = []
    for name, c in results["per_class"].items():
        row = [name, c["correct"], c["total"], pct(c["accuracy"])]
        if is_lecture:
            row.append(f"{LECTURE['per_class'][name]:.1f} %")
        rows.append(row)
    return [
        "<h2>Per-class accuracy</h2>",
        table(headers, rows, "per-class"),
        img(r.fig / "confusion_matrix.png", f"confusion matrix on the {r.set_name} (rows: true class)", "native"),
    ]


def _representation(r: _Run) -> list[str]:
    rep = (r.results or {}).get("representation")
    if not rep:
        return []
    rand = rep.get("random") or {}
    gain = lambda key: f"{100 * (rep[key] - rand[key]):+.2f} points" if key in rand else ""
    return [
        "<h2>The frozen representation</h2>",
        table(
            ["probe", "trained encoder", "random weights", "training added", "setting"],
            [
                [
                    "kNN",
                    pct(rep["knn_accuracy"]),
                    pct(rand.get("knn_accuracy")),
                    gain("knn_accuracy"),
                    f"k={rep['knn']['k']}, cosine similarity, votes weighted exp(sim/{rep['knn']['temperature']})",
                ],
                [
                    "linear probe",
                    pct(rep["linear_probe_accuracy"]),
                    pct(rand.get("linear_probe_accuracy")),
                    gain("linear_probe_accuracy"),
                    f"logistic regression, full-batch L-BFGS ({rep['linear_probe']['max_iter']} iterations, "
                    f"L2 {rep['linear_probe']['l2']}), standardised features",
                ],
            ],
            "representation",
            left=1,
            text=(4,),
        ),
        f'<p class="note">Features: {html.escape(rep.get("features", "latent"))}. The random-weights '
        "column is the same architecture, untrained (seeded), through the same probes on the same "
        "images: what pretraining bought is the difference.</p>",
        f'<p class="note">{html.escape(rep["encoder"])} encoder; labelled bank: '
        f"{html.escape(rep['bank'])}{html.escape(', ' + rep['bank_sample']) if rep.get('bank_sample') else ''}; "
        f"evaluated on the {html.escape(rep['eval_set'])}.</p>",
        img(r.fig / "embedding_map.png", f"t-SNE map of the {r.set_name}'s embeddings"),
    ]


def _sweep(r: _Run) -> list[str]:
    sweep = r.sweep
    if not sweep:
        return []
    cell = {(c["method"], c["labels_per_class"]): c for c in sweep["summary"]}
    rows = [[name] + [_mean_std(cell.get((m, b))) for b in sweep["budgets"]] for m, name in sweep["methods"].items()]
    return [
        "<h2>Label efficiency</h2>",
        table(["method"] + [budget_heading(sweep, b, " / ") for b in sweep["budgets"]], rows, "sweep"),
        f'<p class="note">Mean ± std over seeds {html.escape(str(sweep["seeds"]))}; every cell trains '
        f"{_cell_length(sweep)} of batch {html.escape(str(sweep['batch_size']))} on the same labelled subset; "
        f"evaluated on the {html.escape(sweep['eval_set'])}. {html.escape(capped_note(sweep))}</p>",
        img(r.fig / "label_efficiency.png", "accuracy against labelled images per class"),
        img(r.fig / "cell_curves.png", "every cell's accuracy along its steps (--curves)"),
        img(r.fig / "cell_curves_seconds.png", "every cell's accuracy along its training time (--curves)"),
    ]


def _cell_length(sweep: dict) -> str:
    """How long every cell trains: a fixed number of steps, or the run's recipe."""
    if sweep.get("steps") is not None:
        return f"{html.escape(str(sweep['steps']))} steps"
    return (
        f"{html.escape(str(sweep.get('finetune_epochs')))} epochs of at least "
        f"{html.escape(str(sweep.get('epoch_images') or 0))} images (the labelled set repeated)"
    )


def _mean_std(c: dict | None) -> str:
    """A sweep cell's mean ± std over seeds; the mean alone when it was measured once."""
    if c is None:
        return ""
    return f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f} %" if c.get("n", 2) > 1 else f"{100 * c['mean']:.2f} %"


def _config(r: _Run) -> list[str]:
    if not r.cfg:
        return []
    parts = ["<h2>Configuration</h2>"]
    shown = r.cfg
    if not r.pretrained_here:  # the autoencoder came from a checkpoint: its recipe is not this run's
        shown = {k: v for k, v in r.cfg.items() if k not in PRETRAIN_KEYS}
        source = r.cfg.get("init_checkpoint") or (r.sweep or {}).get("autoencoder")
        if source and (r.sweep is None or r.cfg.get("init_checkpoint")):
            parts.append(
                f'<p class="note">No pretraining in this run: the autoencoder came from '
                f"<code>{html.escape(str(source))}</code>; its own config.json holds its recipe.</p>"
            )
    # the recipe is what differs from the defaults and what the run used; the rest, folded, would bury it
    defaults = _default_config()
    used = {
        k: v
        for k, v in shown.items()
        if (k in ALWAYS_SHOWN or k not in defaults or defaults[k] != v) and _used(k, r.cfg)
    }
    rows = lambda keys: [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in keys.items()]
    parts.append(table(["key", "value"], rows(used), "config", left=2))
    rest = {k: v for k, v in shown.items() if k not in used}
    if rest:
        parts.append(
            f'<details><summary class="note">The {len(rest)} other keys: at their defaults, or for a training mode '
            "this run did not use (config.json holds every key)</summary>"
            + table(["key", "value"], rows(rest), "config-rest", left=2)
            + "</details>"
        )
    return parts


def _used(key: str, cfg: dict) -> bool:
    """Whether the run used ``key``: a training mode's knob only where the run trained with that mode (its
    help says which: ``--joint gamma: ...``, ``--joint fixmatch|flexmatch|freematch: ...``)."""
    knob = Config.__dataclass_fields__.get(key)
    said = re.match(r"--joint(?: ([\w|]+))?:", knob.metadata.get("help", "")) if knob is not None else None
    if said is None:
        return True
    mode = str(cfg.get("joint", "off"))
    return mode != "off" and (said.group(1) is None or mode in said.group(1).split("|"))


ALWAYS_SHOWN = ("preset", "data")


def _default_config() -> dict:
    """Every key's default, as config.json writes it (tuples as lists)."""
    return {
        f: list(d.default) if isinstance(d.default, tuple) else d.default
        for f, d in Config.__dataclass_fields__.items()
    }


def write_report(run: str | Path) -> Path:
    """Write ``RUN/report.html`` and return its path."""
    run = Path(run)
    try:
        page = build_report(run)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        # the files parsed but do not hold what convae writes: edited, or from another version
        raise ConvaeError(
            f"the run folder {run} holds damaged results ({type(e).__name__}: "
            f"{clip(first_line(e), 60)}); the report was not written"
        ) from None
    return atomic_write_text(run / "report.html", page)
