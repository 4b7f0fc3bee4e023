"""``summary(model, input_shape)``: a per-layer table of output shapes,
parameters and multiply-adds, like torchinfo."""
import numpy

from .. import backend, nn


def _macs(module, out_shape):
    """Multiply-adds of one sample through a leaf layer."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return int(numpy.prod(out_shape[1:])) * module.in_channels * kh * kw
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


def summary(model, input_shape, print_fn=print):
    """Run one sample of ``input_shape`` (C, H, W) or (1, C, H, W) through ``model``
    in eval mode and print a table; returns the rows as a list of dicts plus totals.

    The model's mode and caches are restored afterwards.
    """
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    dtype = next(iter(model.named_parameters().values())).dtype
    x = backend.to_device(numpy.zeros(shape, dtype=dtype))
    modes = {name: m.training for name, m in model.named_modules()}
    rows = []

    def record(name, m, forward, inp):
        out = forward(inp)
        rows.append({"layer": name, "type": type(m).__name__, "output_shape": tuple(out.shape[1:]),
                     "params": sum(int(p.size) for p in m.params.values()), "macs": _macs(m, out.shape)})
        return out

    try:
        model.eval()
        with model.hooks(forward=record):
            model(x)
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
            m.cache = None
    total_params = model.num_parameters()
    total_macs = sum(r["macs"] for r in rows)
    lines = [f"{'layer':<32} {'type':<18} {'output shape':<18} {'params':>11} {'mult-adds':>15}", "-" * 98]
    for r in rows:
        lines.append(f"{r['layer']:<32} {r['type']:<18} {str(r['output_shape']):<18} "
                     f"{r['params']:>11,} {r['macs']:>15,}")
    lines += ["-" * 98, f"total parameters: {total_params:,}", f"total mult-adds (per image): {total_macs:,}"]
    print_fn("\n".join(lines))
    return {"rows": rows, "total_params": total_params, "total_macs": total_macs}
