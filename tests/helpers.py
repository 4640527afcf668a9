"""Small helpers the test modules share."""

from hypothesis import HealthCheck, settings


def examples(n):
    """Hypothesis settings for a property worth n examples under the "ci" profile (25 by default), scaled up
    under "thorough". The `device` fixture is a plain torch.device, safe to share between examples."""
    return settings(
        max_examples=max(1, n * settings.default.max_examples // 25),
        suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
    )


def first_difference(actual, expected, allowed):
    """Where two tensors of one shape differ by more than `allowed`, for an assert's message: how many values
    differ, the first of them in row-major order (its index and both values), so that a student can look there.
    A NaN on either side counts as a difference."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~((actual - expected).abs() <= allowed)
    if not bad.any():
        return ""
    if bad.numel() == 1:
        return f"; got {actual.item():.6g}, expected {expected.item():.6g}"
    first = tuple(int(i) for i in bad.nonzero()[0])
    return (f"; {int(bad.sum())} of {bad.numel()} values differ, the first at index {first}: got "
            f"{actual[first].item():.6g}, expected {expected[first].item():.6g}")
