"""What the CanKD student attends to: a picture of a finished demo run.

    python -m cankd_jax.viz --workdir /tmp/demo --out attention.png

`--workdir` is a workdir of `train.py --config configs/demo.py` with its `teacher`, `student` and `cankd`
phases finished (or name the three run directories with `--teacher/--student/--cankd`, e.g. cells of
`benchmarks/kd_study.py`, whose `config.json` is read). For a few held-out images, one row each:

  image | ground truth | teacher | student alone | CanKD student   (predictions: argmax of the logits)
  attention of three marked student pixels over the teacher's positions
  PCA of the layer4 features of the teacher, the student alone and the CanKD student (3 components as RGB)

The attention of student pixel i is row i of CanKD's `A = q k^T / N` (q = theta(connector(student layer4)),
k = pool(phi(teacher layer4)), N the pooled teacher positions): the trained loss module's weights, read from the
cankd phase's newest checkpoint (`params['distill'][term]['loss']`; `export/` holds the student alone). The
loss never forms A (it computes q (k^T v / N)); here one row per marked pixel is computed for display, shown
with each pooled teacher position as the block of image pixels it covers. A has no softmax, so rows are signed:
red is positive, blue negative, white zero, on a scale symmetric about zero per panel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cankd_jax.layers import dense_nhwc, max_pool_2x2
from cankd_jax.losses import CanKDLoss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.py")
PANEL_IN, ROW_IN, HEADER_IN = 1.6, 1.8, 0.5  # inches: column width, row height, title band
COLUMNS = ("image", "ground truth", "teacher", "student alone", "CanKD student", "attention 1", "attention 2",
           "attention 3", "PCA teacher", "PCA student", "PCA CanKD student")
MARKERS = ("#ff2020", "#20e020", "#20c0ff")
PALETTE = np.array([[20, 20, 20], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], np.uint8)

Array = jax.Array


def figure_pixels(n_images: int, dpi: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for `n_images` rows at `dpi`."""
    return round(len(COLUMNS) * PANEL_IN * dpi), round((HEADER_IN + n_images * ROW_IN) * dpi)


# --- the computation ------------------------------------------------------------------------------------------


def attention_rows(loss: CanKDLoss, loss_params: Any, student: Array, teacher: Array,
                   pixels: Sequence[tuple[int, int]]) -> np.ndarray:
    """Rows of CanKD's attention matrix `q k^T / N` for the marked student pixels of one image.

    Args:
      loss: the (dot-product) `CanKDLoss` whose parameters `loss_params` are (`params['distill'][term]['loss']`).
      student: `(H, W, C)` the student map as the loss sees it (after the connector).
      teacher: `(H, W, C)` the teacher map.
      pixels: `(y, x)` student positions on the `H x W` grid.
    Returns `(len(pixels), Hp, Wp)`: entry `[i, a, b]` is the weight of pooled teacher position `(a, b)` for
    pixel i, i.e. row `y * W + x` of the loss's (B, P, N) matrix, reshaped to the pooled grid.
    """
    if loss.attention != "dot":
        raise ValueError(f"the picture shows the dot-product attention; this loss uses attention={loss.attention!r}")
    nl = loss_params["non_local_att"]
    q = dense_nhwc(student[None], nl["theta"]["kernel"], nl["theta"]["bias"])[0]
    k = dense_nhwc(teacher[None], nl["phi"]["kernel"], nl["phi"]["bias"])
    k = (max_pool_2x2(k) if loss.sub_sample else k)[0]
    n = k.shape[0] * k.shape[1]
    return np.stack([np.asarray(jnp.einsum("abc,c->ab", k, q[y, x]) / n) for y, x in pixels])


def upsample_nearest(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(h, w, ...)` -> `(H, W, ...)`: each cell becomes the block of output pixels it covers."""
    h, w = grid.shape[:2]
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return grid[rows][:, cols]


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """`(n, h, w, C)` -> `(n, h, w, 3)` in [0, 1]: the 3 leading principal components over all n images' positions,
    each stretched from its 2nd to its 98th percentile (signs fixed so each component's largest loading is > 0)."""
    n, h, w, c = features.shape
    x = features.reshape(-1, c).astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:3]
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]
    y = x @ comps.T
    if y.shape[1] < 3:
        y = np.pad(y, ((0, 0), (0, 3 - y.shape[1])))
    lo, hi = np.percentile(y, 2, axis=0), np.percentile(y, 98, axis=0)
    y = np.clip((y - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return y.reshape(n, h, w, 3)


def pick_pixels(label: np.ndarray, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Three student pixels on the `grid` (layer4) of one image: inside the largest object class, inside the
    second (or elsewhere in the first), and in the background; each where its 3x3 neighbourhood agrees most."""
    h, w = grid
    ys = ((np.arange(h) + 0.5) * label.shape[0] / h).astype(int)
    xs = ((np.arange(w) + 0.5) * label.shape[1] / w).astype(int)
    g = label[ys][:, xs]
    padded = np.pad(g, 1, constant_values=-1)
    agree = sum((padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == g) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    classes, counts = np.unique(g[(g > 0) & (g != 255)], return_counts=True)
    order = [int(c) for c in classes[np.argsort(-counts, kind="stable")]]
    chosen: list[tuple[int, int]] = []

    def best(mask: np.ndarray) -> Optional[tuple[int, int]]:
        if chosen:  # prefer cells away from those already chosen
            yy, xx = np.mgrid[:h, :w]
            far = np.min([np.hypot(yy - y, xx - x) for y, x in chosen], axis=0)
        else:
            far = np.zeros((h, w))
        score = np.where(mask, agree * 100 + far, -np.inf)
        for y, x in chosen:
            score[y, x] = -np.inf
        if not np.isfinite(score).any():
            return None
        return tuple(int(i) for i in np.unravel_index(np.argmax(score), score.shape))

    for mask in ([g == order[0]] if order else []) + ([g == order[1]] if len(order) > 1 else [g > 0]) + [g == 0]:
        p = best(mask)
        chosen.append(p if p is not None else best(np.ones_like(g, bool)))
    while len(chosen) < 3:
        chosen.append(best(np.ones_like(g, bool)))
    return chosen[:3]


# --- loading a finished demo workdir --------------------------------------------------------------------------


def _config(run_dir: str, workdir: Optional[str], config_path: str) -> ml_collections.ConfigDict:
    """The cankd run's config: its `config.json` (study cells) or the demo config's `cankd` phase."""
    saved = os.path.join(run_dir, "config.json")
    if os.path.exists(saved):
        with open(saved) as f:
            return ml_collections.ConfigDict(json.load(f))
    from cankd_jax.config_arg import load_config  # noqa: PLC0415
    from cankd_jax.train.runner import phase_config  # noqa: PLC0415

    path, _, arg = config_path.partition(":")
    config = load_config(path, arg)
    if "cankd" not in config.get("phases", ["cankd"]):
        raise ValueError(f"{config_path} has no 'cankd' phase (its phases: {', '.join(config.phases)}); name the "
                         "loss list that made the workdir, e.g. --config configs/demo.py:loss=mgd+cankd")
    return phase_config(config, "cankd", workdir or os.path.dirname(run_dir))


def _restore_export(net: Any, directory: str, sample: Array) -> Any:
    from cankd_jax.train.weights import restore_export  # noqa: PLC0415

    abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), sample, train=False))
    return restore_export(os.path.abspath(directory), abstract, what="export")


def _restore_state(run: Any, config: ml_collections.ConfigDict, mesh: Any, directory: str) -> Any:
    from cankd_jax.train.checkpoint import Checkpointer  # noqa: PLC0415
    from cankd_jax.train.sharding import ParamLayout  # noqa: PLC0415
    from cankd_jax.train.state import TrainState, state_shardings  # noqa: PLC0415

    def init():
        params, stats = run.init_variables(jax.random.key(0))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                          opt_state=run.tx.init(params), rng=jax.random.key_data(jax.random.key(0)))

    abstract = jax.eval_shape(init)
    shardings = state_shardings(abstract, mesh, ParamLayout.from_config(config.get("mesh")))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = Checkpointer(directory)
    try:
        restored = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory}: the cankd phase must have run")
    return restored[1]


def _metric(run_dir: str) -> str:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        s = json.load(f)
    v = (s.get("eval") or {}).get(s.get("metric", "mIoU"))
    return f" {100 * v:.1f}" if isinstance(v, float) else ""


def collect(teacher_dir: str, student_dir: str, cankd_dir: str, *, config_path: str = DEMO_CONFIG,
            workdir: Optional[str] = None, indices: Sequence[int] = (0, 1, 2),
            pixels: Optional[Sequence[tuple[int, int]]] = None, data_dir: Optional[str] = None) -> dict[str, Any]:
    """Everything the picture shows, as arrays (what `render` draws and the tests check), plus the CanKD term's
    loss module, its variables and the maps it compared (`student_map` after the connector, `teacher_map`)."""
    from cankd_jax.train import build  # noqa: PLC0415
    from cankd_jax.train.sharding import make_mesh  # noqa: PLC0415

    teacher_dir, student_dir, cankd_dir = (os.path.abspath(d) for d in (teacher_dir, student_dir, cankd_dir))
    cfg = _config(cankd_dir, workdir, config_path)
    cfg.teacher.checkpoint = os.path.join(teacher_dir, "export")
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    mesh = make_mesh()
    run = build.build_run(cfg, mesh)
    term = next((t for t in run.terms if isinstance(t.loss, CanKDLoss)), None)
    if term is None:
        raise ValueError(f"the run in {cankd_dir} has no CanKD term (its terms: {[t.name for t in run.terms]})")
    state = _restore_state(run, cfg, mesh, os.path.join(cankd_dir, "checkpoints"))

    count = len(run.data.eval_source)
    outside = [int(i) for i in indices if not 0 <= int(i) < count]
    if outside or not indices:
        raise ValueError(f"indices {outside or 'none'}: name held-out images among 0..{count - 1}")
    raw, labels, images = [], [], []
    for i in indices:
        record = run.data.eval_source[int(i)]
        prepared = run.data.eval_transform(record)
        raw.append(np.asarray(record["image"]))
        labels.append(np.asarray(prepared["label"]))
        images.append(prepared["image"])
    x = jnp.asarray(np.stack(images))
    student_alone = _restore_export(run.student, os.path.join(student_dir, "export"), x[:1])
    t_out = jax.jit(lambda v: run.teacher.apply(v, x, train=False))(run.teacher_vars)
    student_fwd = jax.jit(lambda v: run.student.apply(v, x, train=False))
    s_out = student_fwd(student_alone)
    c_out = student_fwd(run.student_variables(state))

    p = state.params["distill"][term.name]
    lifted = c_out[term.student_feature]
    if term.connector is not None:
        lifted = term.connector.apply({"params": p["connector"]}, lifted)
    t_feat = t_out[term.teacher_feature]
    grid = tuple(lifted.shape[1:3])
    # The picture has a column per marked pixel, three; a position off the grid would be clamped by the gather.
    if pixels and (len(pixels) != 3 or any(not (0 <= y < grid[0] and 0 <= x < grid[1]) for y, x in pixels)):
        raise ValueError(f"pixels {list(pixels)}: name three (y, x) positions on the {grid[0]}x{grid[1]} grid of "
                         f"{term.student_feature!r}")
    marked = [list(pixels) if pixels else pick_pixels(lab, grid) for lab in labels]
    rows = [attention_rows(term.loss, p["loss"], lifted[b], t_feat[b], marked[b]) for b in range(len(indices))]
    preds = {k: np.asarray(jnp.argmax(o["logits"], -1)) for k, o in
             (("teacher", t_out), ("student", s_out), ("cankd", c_out))}
    pca = {k: pca_rgb(np.asarray(o[term.student_feature if k != "teacher" else term.teacher_feature]))
           for k, o in (("teacher", t_out), ("student", s_out), ("cankd", c_out))}
    return dict(raw=np.stack(raw), labels=np.stack(labels), preds=preds, pixels=marked, grid=grid,
                rows=np.stack(rows), pca=pca, indices=list(indices), term=term.name, loss=term.loss,
                loss_variables={"params": p["loss"], "batch_stats": state.batch_stats["distill"][term.name]["loss"]},
                student_map=np.asarray(lifted), teacher_map=np.asarray(t_feat),
                metrics={k: _metric(d) for k, d in (("teacher", teacher_dir), ("student", student_dir),
                                                    ("cankd", cankd_dir))})


# --- the picture ----------------------------------------------------------------------------------------------


def _colour(label: np.ndarray) -> np.ndarray:
    out = PALETTE[np.clip(label, 0, len(PALETTE) - 1)]
    out[label == 255] = 255
    return out


def render(data: dict[str, Any], out: str, *, dpi: int = 100) -> tuple[int, int]:
    """Draw `collect`'s arrays into the PNG `out`; returns its (width, height) in pixels."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n = len(data["indices"])
    size = data["raw"].shape[1:3]
    gh, gw = data["grid"]
    fig_w, fig_h = len(COLUMNS) * PANEL_IN, HEADER_IN + n * ROW_IN
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    m = data["metrics"]
    titles = list(COLUMNS)
    titles[2:5] = [f"teacher{m['teacher']}", f"student alone{m['student']}", f"CanKD student{m['cankd']}"]
    fig.suptitle("CanKD: where student pixels look in the teacher's map (row of q k^T / N; red +, blue -); "
                 "numbers: held-out mIoU", fontsize=9, y=1 - 0.12 / fig_h)

    def centre(y: int, x: int) -> tuple[float, float]:
        return (x + 0.5) * size[1] / gw - 0.5, (y + 0.5) * size[0] / gh - 0.5

    for r in range(n):
        gray = data["raw"][r].astype(np.float32).mean(-1) / 255.0
        panels = [data["raw"][r], _colour(data["labels"][r]), _colour(data["preds"]["teacher"][r]),
                  _colour(data["preds"]["student"][r]), _colour(data["preds"]["cankd"][r])]
        for c in range(len(COLUMNS)):
            left = c * PANEL_IN / fig_w
            bottom = (fig_h - HEADER_IN - (r + 1) * ROW_IN) / fig_h
            ax = fig.add_axes((left + 0.05 / fig_w, bottom + 0.05 / fig_h, (PANEL_IN - 0.1) / fig_w,
                               (ROW_IN - 0.3) / fig_h))
            ax.set_xticks([])
            ax.set_yticks([])
            title = titles[c] if c < 5 or c > 7 else ""
            if c < 5:
                ax.imshow(panels[c], interpolation="nearest")
                if c == 0:
                    for (y, x), colour in zip(data["pixels"][r], MARKERS):
                        ax.plot(*centre(y, x), marker="o", markersize=5, markerfacecolor="none",
                                markeredgecolor=colour, markeredgewidth=1.5)
            elif c < 8:
                i = c - 5
                row = data["rows"][r, i]
                lim = float(np.abs(row).max()) or 1.0
                ax.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.imshow(upsample_nearest(row, size), cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.65,
                          interpolation="nearest")
                y, x = data["pixels"][r][i]
                ax.plot(*centre(y, x), marker="o", markersize=5, markerfacecolor="none", markeredgecolor=MARKERS[i],
                        markeredgewidth=1.5)
                title = f"pixel ({y},{x}) ±{lim:.2g}"
            else:
                key = ("teacher", "student", "cankd")[c - 8]
                ax.imshow(upsample_nearest(data["pca"][key][r], size), interpolation="nearest")
            ax.set_title(title, fontsize=7, color=MARKERS[c - 5] if 5 <= c < 8 else "black", pad=2)
            if c == 0:
                ax.set_ylabel(f"test #{data['indices'][r]}", fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return figure_pixels(n, dpi)


def _ints(text: str, option: str, count: Optional[int] = None) -> list[int]:
    """Comma-separated integers (`count` of them, if given), or a `ValueError` naming `option`."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or (count is not None and len(values) != count):
        raise ValueError(f"{option}: expected {count or 'one or more'} comma-separated integers, got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cankd_jax.viz", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="a finished demo workdir (its teacher/, student/ and cankd/ runs)")
    p.add_argument("--teacher", help="the teacher run's directory (default WORKDIR/teacher)")
    p.add_argument("--student", help="the student-alone run's directory (default WORKDIR/student)")
    p.add_argument("--cankd", help="the CanKD run's directory (default WORKDIR/cankd)")
    p.add_argument("--config", default=DEMO_CONFIG, help="the config that made WORKDIR (path[:arg]); a run "
                   "directory's config.json takes precedence")
    p.add_argument("--data-dir", default=None, help="the TFDS dir the run read (if it set --config.data.data_dir)")
    p.add_argument("--out", default="attention.png")
    p.add_argument("--indices", default="0,1,2", help="held-out images to show (comma-separated)")
    p.add_argument("--pixels", default="", help="'y,x;y,x;y,x' layer4 positions to mark (default: chosen per image)")
    p.add_argument("--dpi", type=int, default=100)
    a = p.parse_args(argv)
    dirs = {k: getattr(a, k) or (os.path.join(a.workdir, k) if a.workdir else None)
            for k in ("teacher", "student", "cankd")}
    missing = [k for k, d in dirs.items() if not d or not os.path.isdir(d)]
    if missing:
        sys.exit(f"viz: error: no {', '.join(missing)} run directory; pass --workdir of a finished demo run "
                 "(teacher, student and cankd phases) or --teacher/--student/--cankd")
    if a.dpi <= 0:
        p.error(f"--dpi must be positive, got {a.dpi}")
    try:
        pixels = [tuple(_ints(s, "--pixels", 2)) for s in a.pixels.split(";")] if a.pixels else None
        indices = _ints(a.indices, "--indices")
    except ValueError as e:
        p.error(str(e))
    try:
        data = collect(dirs["teacher"], dirs["student"], dirs["cankd"], config_path=a.config, workdir=a.workdir,
                       indices=indices, pixels=pixels, data_dir=a.data_dir)
    except (ValueError, FileNotFoundError) as e:  # a config, export or option that does not fit: one line
        sys.exit(f"viz: error: {e}")
    w, h = render(data, a.out, dpi=a.dpi)
    print(f"wrote {a.out} ({w}x{h})")


if __name__ == "__main__":
    main()
