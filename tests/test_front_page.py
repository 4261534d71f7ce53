"""What the README's quick commands rely on and no other test covered: export.py on a run of config.yaml's
defaults (sample.variance auto)."""
import config
import export


def test_a_default_config_exports_with_the_variance_auto_means_at_all_steps() -> None:
    """sample.variance defaults to auto, which samples σ² = β at all T steps (the pipeline's default): fixed_large.
    It used to be a KeyError, so `python export.py` failed with a traceback on every run of the defaults."""
    cfg = config.to_dict(config.Config())
    assert cfg["sample"]["variance"] == "auto"
    assert export.scheduler_config(cfg)["variance_type"] == "fixed_large"
    for variance, expected in (("beta", "fixed_large"), ("posterior", "fixed_small")):
        cfg["sample"]["variance"] = variance
        assert export.scheduler_config(cfg)["variance_type"] == expected
