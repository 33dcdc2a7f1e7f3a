"""Pass ``distill``: fine-tune a (pruned) student model against the fp32 teacher's outputs (torch + onnxruntime).

1. The teacher (the ORIGINAL model) runs once in ONNX Runtime on the user's unlabelled feeds; its outputs are
   the targets. A ``validation`` share of the feeds (chosen with ``seed``) is held out for early stopping.
2. The student ONNX graph runs in torch (``_torchgraph.GraphModule``: its weights become parameters, the graph
   stays as it is). Loss per output: classifier outputs ([N, C], C >= 2) ``T^2 * KL(teacher || student)`` at
   temperature ``T`` over the class distributions (scores are softmaxed; rows that already are probabilities
   are taken as they are); dense outputs the mean squared error divided by the teacher's mean square. Adam.
3. After each epoch the validation figure (KL at T = 1, or the relative MSE; summed over the outputs) is
   measured; the best epoch's weights are kept, and training stops early after ``patience`` epochs that did not
   improve it by ``min_improvement`` (relative). Epoch 0 is the student as given: if no epoch beats it, the
   student comes out unchanged.
4. The trained weights go back into the student's own ONNX graph (same nodes, names, opset and dynamic dims),
   which must reproduce the torch module in ONNX Runtime before it is written.

    from converter import passes
    step = passes.load("distill")
    result = step.run(student, step.config(epochs=20), out, teacher=original, data=feeds, progress=print)

torch is imported inside ``run`` (the ``distill`` extra); ``require()`` says how to install it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from converter import ConvertError
from converter.passes import Pass, PassResult

MISSING = "--distill needs torch: pip install 'edgefleet[distill]'"
_EPS = 1e-12


class DistillConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    epochs: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 15  # at most; early stop usually ends sooner
    learning_rate: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 1e-4  # Adam
    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 16  # samples a step (stacked data) or feeds a step
    patience: Annotated[int, msgspec.Meta(ge=1)] = 3  # epochs without a better validation figure before stopping
    min_improvement: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.01  # relative; smaller is no improvement
    temperature: Annotated[float, msgspec.Meta(gt=0.0)] = 2.0  # softens both distributions in the KL loss
    validation: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.2  # share of the feeds held out for early stop
    seed: int = 0  # the validation split, the order of the samples, torch's generator
    # torch's intra-op threads. 1 by default: on this 2-vCPU machine shared with other jobs, 2 threads made a
    # training step of the PP-OCR classifier 10-20x SLOWER than 1 (0.3 s vs 3-7 s for 16 crops; OpenMP's threads
    # wait on each other whenever one is descheduled); 0: torch's default (one per core)
    threads: Annotated[int, msgspec.Meta(ge=0)] = 1
    output_kinds: dict[str, Literal["classifier", "dense"]] = {}  # overrides; default [N, C>=2] is a classifier


class Distill(Pass):
    name = "distill"
    Config = DistillConfig
    toolchain = ("torch", "onnx", "onnxruntime", "numpy")

    def run(self, model_path: Path, config: DistillConfig, out_path: Path, *, teacher: Path | None = None,
            data=None, progress: Callable[[str], None] | None = None) -> PassResult:
        """Fine-tune ``model_path`` (the student) against ``teacher`` (an ONNX model with the same inputs and
        outputs) on ``data`` (``converter.calib.Feeds``, or stacked arrays ``{input: [n, ...]}``)."""
        torch = require()
        import onnx
        import onnxruntime as ort

        from converter.calib import as_feeds
        from converter.passes import _onnxgraph as og
        from converter.passes import _torchgraph

        say = progress or (lambda line: None)
        model_path, out_path = Path(model_path), Path(out_path)
        if teacher is None or data is None:
            raise ConvertError("distill: give the teacher model and the training data (teacher=..., data=...)")
        if out_path.resolve() == model_path.resolve():
            raise ConvertError(f"{out_path}: the distilled model must go to a new file, not over its input")
        feeds = as_feeds(data)
        if len(feeds) < 2:
            raise ConvertError(f"distill: {len(feeds)} training feed(s); need at least 2 (one held out for early stop)")
        student_model = og.load(model_path)
        module = _torchgraph.GraphModule(student_model)  # an op torch cannot run: one line naming it, before work
        missing = [n for n in module.inputs if n not in feeds[0]]
        if missing:
            raise ConvertError(f"distill: the training feeds have no array for the student's input {missing[0]!r}")
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        threads_before = torch.get_num_threads()
        if config.threads:
            torch.set_num_threads(config.threads)
        try:
            return self._train(torch, ort, onnx, module, student_model, feeds, config, model_path, out_path,
                               teacher, say, t0)
        finally:
            torch.set_num_threads(threads_before)

    def _train(self, torch, ort, onnx, module, student_model, feeds, config, model_path, out_path, teacher, say, t0):
        from converter.measure import is_probability, output_kind
        from converter.passes.prune import _write_new


        # the teacher's outputs, once, in ONNX Runtime (batched where the feeds stack)
        batch = _fixed_batch(student_model) if feeds.stacked else None
        size = batch or config.batch_size
        try:
            session = ort.InferenceSession(str(teacher), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            if names != module.outputs:
                raise ConvertError(f"distill: the teacher's outputs {names} are not the student's {module.outputs}")
            inputs = [i.name for i in session.get_inputs()]
            teach = [dict(zip(names, session.run(None, {k: f[k] for k in inputs})))
                     for f in feeds.batches(batch or 32, whole=bool(batch))]
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError(f"distill: the teacher fails on the training data: {_first_line(e)}") from None
        if feeds.stacked:
            x = {k: v for k, v in feeds.arrays().items() if k in module.inputs}
            n = len(next(iter(x.values())))
            if batch:
                n -= n % batch
            y = {k: np.concatenate([t[k] for t in teach])[:n] for k in names}
        else:
            n = len(feeds)
        kinds = {k: config.output_kinds.get(k) or output_kind(y[k] if feeds.stacked else teach[0][k]) for k in names}
        for k, kind in kinds.items():
            if kind == "classifier" and np.ndim(y[k] if feeds.stacked else teach[0][k]) != 2:
                raise ConvertError(f"distill: output {k!r} is not [N, C]: it cannot be judged as a classifier")
        probabilities = {k: is_probability(y[k] if feeds.stacked else np.concatenate([t[k] for t in teach]))
                         for k in names if kinds[k] == "classifier"}

        rng = np.random.default_rng(config.seed)
        units = batch or 1  # samples are chosen in whole fixed batches
        order = rng.permutation(n // units)
        n_val = max(1, int(round(len(order) * config.validation)))
        if n_val >= len(order):
            raise ConvertError(f"distill: {n} training feeds leave none to train on after holding out "
                               f"{config.validation:.0%} for early stop")
        val_units, train_units = order[:n_val], order[n_val:]

        def samples(unit_ids) -> np.ndarray:
            return np.concatenate([np.arange(u * units, (u + 1) * units) for u in unit_ids])

        def steps(unit_ids, step: int):
            """Lists of (inputs as tensors, teacher outputs as tensors): one forward each."""
            ids = samples(unit_ids)
            for i in range(0, len(ids), step):
                chunk = ids[i : i + step]
                if feeds.stacked:
                    yield [({k: torch.from_numpy(v[chunk]) for k, v in x.items()},
                            {k: torch.from_numpy(np.asarray(y[k][chunk])) for k in names})]
                else:
                    yield [({k: torch.from_numpy(np.asarray(feeds[j][k])) for k in module.inputs},
                            {k: torch.from_numpy(np.asarray(teach[j][k])) for k in names}) for j in chunk]

        def loss(out, target, temperature: float):
            total = 0.0
            for k in names:
                s, t = out[k].float(), target[k].float().reshape(out[k].shape)
                if kinds[k] == "classifier":
                    total = total + _kl(torch, t, s, probabilities[k], temperature)
                else:
                    total = total + ((s - t) ** 2).mean() / ((t**2).mean() + _EPS)
            return total

        def evaluate() -> tuple[float, float | None]:
            """The validation figure (summed over the outputs, at T = 1) and the first classifier's top-1."""
            total, count, same, rows = 0.0, 0, 0, 0
            first = next((k for k in names if kinds[k] == "classifier"), None)
            with torch.no_grad():
                for group in steps(val_units, size):
                    for inp, target in group:
                        out = module(inp)
                        w = len(next(iter(inp.values()))) if feeds.stacked else 1
                        total += float(loss(out, target, 1.0)) * w
                        count += w
                        if first is not None:
                            t = target[first].reshape(out[first].shape)
                            same += int((out[first].argmax(1) == t.argmax(1)).sum())
                            rows += len(t)
            return total / count, (same / rows if rows else None)

        figure = " + ".join(("KL" if kinds[k] == "classifier" else "relative MSE") + (f" ({k})" if len(names) > 1
                                                                                          else "") for k in names)
        n_train = len(samples(train_units)) if feeds.stacked else len(train_units)
        n_valid = len(samples(val_units)) if feeds.stacked else len(val_units)
        say(f"distilling: {n_train} training feeds and {n_valid} held out for early stop, up to {config.epochs} "
            f"epochs (Adam lr {config.learning_rate:g}, batch {size}, temperature {config.temperature:g}, patience "
            f"{config.patience}); {sum(p.numel() for p in module.parameters()):,} parameters in "
            f"{len(module.trainable)} tensors; torch {torch.__version__}, {torch.get_num_threads()} thread(s) ...")
        before, top1_before = evaluate()
        say(f"distill epoch 0/{config.epochs}: validation {figure} {before:.4g}"
            + (f", top-1 agreement {top1_before:.1%}" if top1_before is not None else "") + " (the student as given)")
        best, best_epoch, best_top1 = before, 0, top1_before
        best_state = copy.deepcopy(module.state_dict())
        optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
        history, since, stopped = [], 0, False
        for epoch in range(1, config.epochs + 1):
            t_epoch = time.perf_counter()
            order_e = rng.permutation(train_units)
            run_loss, seen = 0.0, 0
            for group in steps(order_e, size):
                optimizer.zero_grad()
                total = sum(loss(module(inp), target, config.temperature) for inp, target in group) / len(group)
                total.backward()
                optimizer.step()
                w = len(next(iter(group[0][0].values()))) if feeds.stacked else len(group)
                run_loss += float(total.detach()) * w
                seen += w
            value, top1 = evaluate()
            improved = value < best * (1 - config.min_improvement) - _EPS
            if improved:
                best, best_epoch, best_top1, since = value, epoch, top1, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                since += 1
            stopped = since >= config.patience and epoch < config.epochs
            history.append({"epoch": epoch, "train_loss": round(run_loss / seen, 6), "validation": round(value, 6),
                            "validation_top1": top1, "seconds": round(time.perf_counter() - t_epoch, 2)})
            tag = "best" if improved else (f"stopping early: no better validation {figure} for {since} epochs, "
                                           f"keeping epoch {best_epoch}" if stopped else "")
            say(f"distill epoch {epoch}/{config.epochs}: train loss {run_loss / seen:.4g}, validation {figure} "
                f"{value:.4g}" + (f", top-1 agreement {top1:.1%}" if top1 is not None else "")
                + f" ({time.perf_counter() - t_epoch:.0f} s){'; ' + tag if tag else ''}")
            if stopped:
                break
        module.load_state_dict(best_state)

        # the weights back into the student's graph; it must compute what the torch module computes
        trained = module.write_weights()
        try:
            onnx.checker.check_model(trained)
        except onnx.checker.ValidationError as e:
            raise ConvertError(f"the distilled model is not valid ONNX: {_first_line(e)}") from None
        data_bytes = trained.SerializeToString()
        check = ort.InferenceSession(data_bytes, providers=["CPUExecutionProvider"])
        diff = 0.0
        with torch.no_grad():
            group = next(steps(val_units, size))
            for inp, _ in group:
                want = module(inp)
                got = check.run(None, {k: v.numpy() for k, v in inp.items()})
                for k, g in zip(names, got):
                    w = want[k].numpy()
                    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
                    diff = max(diff, float(np.abs(g.astype(np.float64) - w).max(initial=0.0)) / scale)
        if diff > 1e-3:
            raise ConvertError(f"the distilled model does not reproduce the trained weights in ONNX Runtime "
                               f"(relative max abs diff {diff:.3g})")
        _write_new(out_path, data_bytes)
        notes: dict[str, Any] = {
            "train_feeds": n_train, "validation_feeds": n_valid, "data_stacked": feeds.stacked,
            "outputs": kinds, "figure": figure,
            "epochs_run": len(history), "best_epoch": best_epoch, "stopped_early": stopped,
            "validation": {"before": round(before, 6), "after": round(best, 6),
                           "top1_before": top1_before, "top1_after": best_top1},
            "epochs": history,
            "parameters": sum(p.numel() for p in module.parameters()), "parameter_tensors": len(module.trainable),
            "export_check": {"runtime": "onnxruntime", "relative_max_abs_diff": diff},
            "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
        }
        return self.result(config, out_path, notes)


PASS = Distill()


def require():
    """torch, or one ConvertError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise ConvertError(MISSING) from None
    return torch


def _kl(torch, teacher, student, probabilities: bool, temperature: float):
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)); rows that are probabilities
    are taken as log-probabilities first."""
    if probabilities:
        teacher = torch.log(teacher.clamp_min(_EPS))
        student = torch.log(student.clamp_min(_EPS))
    log_p = torch.log_softmax(teacher / temperature, dim=1)
    log_q = torch.log_softmax(student / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean() * temperature**2


def _fixed_batch(model) -> int | None:
    """The student's batch (axis 0 of its first input) when the model fixes it above 1, else None."""
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 1:
            return dims[0].dim_value
        return None
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def render(report: dict) -> str:
    """The distillation section of the converter's summary, in one line."""
    n, v = report["notes"], report["notes"]["validation"]
    top1 = (f", top-1 agreement {v['top1_before']:.1%} -> {v['top1_after']:.1%}"
            if v.get("top1_before") is not None else "")
    return (f"distilled the pruned model against the original on {n['train_feeds']} feeds ({n['validation_feeds']} held "
            f"out for early stop): {n['epochs_run']} epochs, best {n['best_epoch']}"
            f"{', stopped early' if n['stopped_early'] else ''}; validation {n['figure']} {v['before']:.4g} -> "
            f"{v['after']:.4g}{top1}; {n['seconds']:.0f} s")
