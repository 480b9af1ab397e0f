"""Tolerance comparisons of tensors and model gradients that say where and by how much they differ."""

import torch


def _worst_mismatches(actual, expected, rtol, atol, limit):
    """(count, lines) for the entries outside ``atol + rtol * |expected|``, worst first."""
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    close = torch.isclose(actual64, expected64, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return 0, []
    excess = ((actual64 - expected64).abs() - rtol * expected64.abs()).nan_to_num(nan=float("inf"))
    excess = excess.masked_fill(close, -float("inf")).reshape(-1)
    lines = []
    for flat in excess.topk(min(limit, int((~close).sum()))).indices.tolist():
        index = tuple(torch.unravel_index(torch.tensor(flat), actual64.shape)) if actual64.dim() else ()
        index = tuple(int(i) for i in index)
        a, e = actual64.reshape(-1)[flat].item(), expected64.reshape(-1)[flat].item()
        lines.append(f"  at {index}: actual {a:.9g} expected {e:.9g} (abs diff {abs(a - e):.3g})")
    return int((~close).sum()), lines


def assert_tensors_close(actual, expected, rtol, atol, name="tensor", limit=5):
    """Fail with the worst ``limit`` mismatches (index, values) when ``actual`` != ``expected`` within tolerance."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    count, lines = _worst_mismatches(actual, expected, rtol, atol, limit)
    assert count == 0, (
        f"{name}: {count} of {expected.numel()} entries differ beyond rtol={rtol} atol={atol}\n" + "\n".join(lines)
    )


def assert_grads_close(model_a, model_b, rtol, atol, limit=3):
    """Fail unless every parameter of ``model_a`` has the gradient of its namesake in ``model_b``.

    Reports every mismatching parameter with its worst entries; a gradient present on one side only
    is a mismatch. At least one gradient must exist, so the check cannot pass vacuously.
    """
    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert params_a.keys() == params_b.keys(), f"parameter names differ: {params_a.keys() ^ params_b.keys()}"
    failures, compared = [], 0
    for name, param_a in params_a.items():
        grad_a, grad_b = param_a.grad, params_b[name].grad
        if grad_a is None and grad_b is None:
            continue
        if grad_a is None or grad_b is None:
            failures.append(f"{name}: gradient only on model_{'b' if grad_a is None else 'a'}")
            continue
        compared += 1
        count, lines = _worst_mismatches(grad_a, grad_b, rtol, atol, limit)
        if count:
            failures.append(f"{name}: {count} of {grad_b.numel()} entries differ\n" + "\n".join(lines))
    assert compared, "no parameter has a gradient on either model"
    assert not failures, f"gradients differ beyond rtol={rtol} atol={atol} ({len(failures)} of {compared}):\n" + (
        "\n".join(failures)
    )



def assert_grads_relatively_close(model_a, model_b, max_relative_error, limit=5):
    """`assert_named_grads_relatively_close` on the gradients of two models' namesake parameters."""
    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert params_a.keys() == params_b.keys(), f"parameter names differ: {params_a.keys() ^ params_b.keys()}"
    assert_named_grads_relatively_close({name: p.grad for name, p in params_a.items()},
                                        {name: p.grad for name, p in params_b.items()}, max_relative_error, limit)


def assert_named_grads_relatively_close(grads_a, grads_b, max_relative_error, limit=5):
    """Fail unless, for every name, ``|grad_a - grad_b| / |grad_b|`` (Frobenius norms) is at most ``max_relative_error``.

    For low-precision runs (bf16/fp16), where single entries round differently along two equally
    valid op orders but each gradient as a whole must agree. Reports the ``limit`` worst gradients
    with their errors and norms; a gradient on one side only (None on the other), or a non-finite
    one, is a mismatch. At least one gradient must exist, so the check cannot pass vacuously.
    """
    assert grads_a.keys() == grads_b.keys(), f"gradient names differ: {grads_a.keys() ^ grads_b.keys()}"
    errors, failures = {}, []
    for name, grad_a in grads_a.items():
        grad_b = grads_b[name]
        if grad_a is None and grad_b is None:
            continue
        if grad_a is None or grad_b is None:
            failures.append(f"{name}: gradient only on {'b' if grad_a is None else 'a'}")
            continue
        grad_a, grad_b = grad_a.detach().double().cpu(), grad_b.detach().double().cpu()
        if not (grad_a.isfinite().all() and grad_b.isfinite().all()):
            failures.append(f"{name}: non-finite gradient")
            continue
        norm_b = grad_b.norm().item()
        errors[name] = ((grad_a - grad_b).norm().item() / norm_b if norm_b else grad_a.norm().item(), norm_b)
    assert errors or failures, "no gradient on either side"
    worst = sorted(errors.items(), key=lambda item: -item[1][0])
    failures += [f"{name}: relative error {error:.3g} (|grad_b| = {norm:.3g})"
                 for name, (error, norm) in worst[:limit] if error > max_relative_error]
    assert not failures, (
        f"gradients differ beyond a relative error of {max_relative_error} ({len(errors)} compared):\n"
        + "\n".join(failures)
    )
