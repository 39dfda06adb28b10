"""Draw, for each published scheme on ResNet-32 with K = 4 modules, which parts of the
network each objective's gradient reaches.

Also draws ``docs/figures/sharing.png``: the shared step's plan (pieces, reach, groups).

The marks come from the objectives themselves (``Objective.param_names`` and
``state_names``), not from a hand-written table. Writes ``docs/figures/<scheme>.png`` and
prints the same grids as Markdown tables (pasted into ``docs/schemes.md``).

    python docs/make_figures.py            # needs matplotlib (the `examples` extra)
"""

from __future__ import annotations

from pathlib import Path

import mlaan_func as mf

HERE = Path(__file__).resolve().parent
ARCH, K = "resnet32", 4
SCHEMES = ("e2e", "dgl", "infopro", "mlaan", "dgl_mlaan", "infopro_mlaan")


def module_of_block(at: list[str], block_names: tuple[str, ...]) -> dict[str, int]:
    """Block name -> index of the module it belongs to."""
    ends, owner, i = set(at), {}, 0
    for name in block_names:
        owner[name] = i
        if name in ends:
            i += 1
    return owner


def reach(scheme: list, at: list[str], backbone: mf.Net) -> tuple[list[str], list[str], list[list[str]]]:
    """Rows (objective names), columns and marks: ``"grad"`` where the objective's loss
    has gradient, ``"ema"`` where it runs an EMA twin (no gradient), ``""`` elsewhere."""
    owner = module_of_block(at, backbone.block_names)
    modules = max(owner.values()) + 1
    columns = [f"E{i}" for i in range(modules)] + ["aux head", "trunk copies", "EMA twin"]
    rows, marks = [], []
    for o in scheme:
        row = [""] * len(columns)
        for key in o.param_names:
            root = key.split(".")[0]
            if root.startswith(("head", "chead")):
                row[modules] = "grad"
            elif root.startswith("trunk"):
                row[modules + 1] = "grad"
            else:
                block = next(b for b in backbone.block_names if key.startswith(b + "."))
                row[owner[block]] = "grad"
        if any(k.startswith("twin") for k in o.state_names):
            row[modules + 2] = "ema"
        rows.append(o.name)
        marks.append(row)
    return rows, columns, marks


def build(method: str):
    backbone = mf.from_module(mf.models.resnet32(num_classes=10))
    at = [] if method == "e2e" else mf.published_split(ARCH, K)
    scheme = mf.schemes.build(method, backbone, at)
    return reach(scheme, at, backbone)


def markdown(rows, columns, marks) -> str:
    symbol = {"grad": "●", "ema": "EMA", "": ""}
    lines = ["| objective | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, row in zip(rows, marks):
        lines.append(f"| `{name}` | " + " | ".join(symbol[m] for m in row) + " |")
    return "\n".join(lines)


def draw(method: str, rows, columns, marks, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    colour = {"grad": "#d95f02", "ema": "#7570b3", "": "#f2f2f2"}
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(columns), 0.7 + 0.45 * len(rows)))
    for r, row in enumerate(marks):
        for c, m in enumerate(row):
            ax.add_patch(Rectangle((c, len(rows) - 1 - r), 0.92, 0.85, color=colour[m]))
            if m == "ema":
                ax.text(c + 0.46, len(rows) - 1 - r + 0.42, "EMA", ha="center", va="center",
                        fontsize=7, color="white")
    ax.set_xlim(0, len(columns))
    ax.set_ylim(0, len(rows))
    ax.set_xticks([c + 0.46 for c in range(len(columns))], columns, fontsize=8)
    ax.set_yticks([len(rows) - 1 - r + 0.42 for r in range(len(rows))], rows, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(f"{method}: ResNet-32, K={K if method != 'e2e' else 1} "
                 "(orange: gradient reaches it; purple: runs an EMA twin, no gradient)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_sharing(path: Path, method: str = "dgl_mlaan", modules: int = 6) -> None:
    """The shared step's plan (``mlaan_func.plan``) for ``method`` on ResNet-32 with
    ``modules`` modules: one column per backbone piece (computed once per step), one row per
    objective; a cell is coloured where the objective's gradient reaches the piece — dark
    where it continues below, light where it stops (the piece is the objective's input
    boundary). The bottom line counts the forwards per step of each engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from mlaan_func.plan import plan_scheme

    backbone = mf.from_module(mf.models.resnet32(num_classes=10))
    at = mf.published.split_for(ARCH, backbone.block_names, modules)
    scheme = mf.schemes.build(method, backbone, at)
    plan = plan_scheme(scheme)
    backbone_names = set(backbone.block_names)
    columns = [p for p in plan.pieces if set(p.block_names) <= backbone_names]
    fig, ax = plt.subplots(figsize=(1.4 + 0.95 * len(columns), 1.2 + 0.36 * len(scheme)))
    rows = len(scheme)
    for c, piece in enumerate(columns):
        for r, (o, op) in enumerate(zip(scheme, plan.objectives)):
            if piece.index not in op.path:
                colour = "#f2f2f2"
            else:
                colour = "#fdb863" if op.start == piece.index else "#d95f02"
            ax.add_patch(Rectangle((c, rows - r), 0.92, 0.85, color=colour))
        ax.text(c + 0.46, 0.42, f"{len(piece.users)} → 1", ha="center", va="center", fontsize=8)
    labels = [f"{p.block_names[0]}…{p.block_names[-1]}" if len(p.block_names) > 1 else p.block_names[0]
              for p in columns]
    ax.set_xlim(0, len(columns))
    ax.set_ylim(0, rows + 1)
    ax.set_xticks([c + 0.46 for c in range(len(columns))], labels, fontsize=7)
    ax.set_yticks([rows - r + 0.42 for r in range(rows)] + [0.42],
                  [o.name for o in scheme] + ["forwards per step"], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(f"{method}, ResNet-32, K={modules}: each backbone piece runs once per step\n"
                 "dark: the objective's gradient continues below the piece; light: it stops there "
                 "(its input boundary)\nbottom: forwards of the piece per step, per-objective → shared",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    out = HERE / "figures"
    out.mkdir(exist_ok=True)
    for method in SCHEMES:
        rows, columns, marks = build(method)
        draw(method, rows, columns, marks, out / f"{method}.png")
        print(f"### {method}\n\n{markdown(rows, columns, marks)}\n")
    draw_sharing(out / "sharing.png")


if __name__ == "__main__":
    main()
