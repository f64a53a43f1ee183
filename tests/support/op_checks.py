"""What every op's template test shares: the points of its space worth checking, loading a point
as a variant, the dtype each odd shape is checked in, and the error measure."""
from shared import hardware, variants


def space_points(op) -> list[dict]:
    """Each value of each dimension once, the others at DEFAULT: the interpreter is too slow for
    the whole product, and num_warps changes nothing there."""
    return [dict(op.DEFAULT, **{name: value}) for name, values in op.SPACE.items() for value in values
            if value != op.DEFAULT[name] and not (name == "num_warps" and hardware.interpreted())] + [op.DEFAULT]


def launcher(op, params, tmp_path_factory):
    source = variants.render(op.TEMPLATE, params)
    assert variants.static_problems(source) == []
    return variants.load(source, params, variants.variant_id(source, params), tmp_path_factory.getbasetemp() / "variants")


def dtype_pairs(op, params, shapes) -> list[tuple[int, list[int], str]]:
    """(seed, shape, dtype): the dtypes take turns over the shapes; DEFAULT gets every pair."""
    if params == op.DEFAULT:
        return [(i, s, d) for i, s in enumerate(shapes) for d in op.DTYPES]
    return [(i, s, op.DTYPES[i % len(op.DTYPES)]) for i, s in enumerate(shapes)]


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()
