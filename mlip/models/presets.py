"""Named model sizes. A preset is a handful of hyperparameters; overrides change single ones.

``small`` matches the peers' small models measured in benchmarks (r_max 5, l_max 1, 32 channels,
2 layers, radial MLP 64, 8 Bessel functions, p = 6). NequIP's ``correlation`` > 1 adds MACE-style
density products to each layer (see mlip.models.nequip); every preset is plain NequIP (1).
"""

import math

PRESETS = {
    "allegro": {
        "small": dict(r_max=5.0, l_max=1, num_layers=2, num_scalar=32, num_tensor=32, mlp_hidden=64,
                      readout_hidden=32, num_basis=8, cutoff_p=6),
        "medium": dict(r_max=5.0, l_max=2, num_layers=2, num_scalar=64, num_tensor=32, mlp_hidden=128,
                       readout_hidden=64, num_basis=8, cutoff_p=6),
        "large": dict(r_max=6.0, l_max=3, num_layers=3, num_scalar=128, num_tensor=64, mlp_hidden=256,
                      readout_hidden=128, num_basis=8, cutoff_p=6),
    },
    "nequip": {
        "small": dict(r_max=5.0, l_max=1, parity=True, num_features=32, num_layers=2, correlation=1,
                      num_basis=8, cutoff_p=6, radial_hidden=64, radial_layers=2),
        "medium": dict(r_max=5.0, l_max=2, parity=True, num_features=32, num_layers=4, correlation=1,
                       num_basis=8, cutoff_p=6, radial_hidden=64, radial_layers=2),
        "large": dict(r_max=5.0, l_max=3, parity=True, num_features=64, num_layers=5, correlation=1,
                      num_basis=8, cutoff_p=6, radial_hidden=64, radial_layers=3),
    },
}


def hyperparameters(family: str, preset: str, overrides: dict) -> dict:
    """The preset's hyperparameters with ``overrides`` applied. A bad name or value raises a
    ValueError whose message starts with the culprit as a model config key (``preset``,
    ``overrides.num_layers``...), so the config can name it in full."""
    if family not in PRESETS:
        raise ValueError(f"family: unknown model family {family!r}; choose one of {sorted(PRESETS)}")
    if preset not in PRESETS[family]:
        raise ValueError(f"preset: unknown preset {preset!r} for {family}; choose one of {sorted(PRESETS[family])}")
    params = dict(PRESETS[family][preset])
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"overrides: unknown {family} hyperparameter(s) {unknown}; known: {sorted(params)}")
    for name, value in overrides.items():
        _check_value(name, value, params[name])
    params.update(overrides)
    return params


def _check_value(name: str, value, default) -> None:
    """An override must have its preset value's kind: YAML's "2" or 2.5 for a layer count, or 1 for
    a bool, would otherwise fail deep inside the model, or not at all."""
    if isinstance(default, bool):
        ok, rule = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        low = 0 if name == "l_max" else 1
        ok, rule = isinstance(value, int) and not isinstance(value, bool) and value >= low, f"an integer >= {low}"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        rule = "a finite number > 0"
    if not ok:
        raise ValueError(f"overrides.{name}: expected {rule}, got {value!r}")
