"""Small helpers the test modules share."""

from hypothesis import HealthCheck, settings


def examples(n):
    """Hypothesis settings for a property worth n examples under the "ci" profile (25 by default), scaled up
    under "thorough". The `device` fixture is a plain torch.device, safe to share between examples."""
    return settings(
        max_examples=max(1, n * settings.default.max_examples // 25),
        suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
    )
