"""Named model sizes. A preset is a handful of hyperparameters; overrides change single ones.

``small`` matches the peers' small models measured in benchmarks (r_max 5, l_max 1, 32 channels,
2 layers, radial MLP 64, 8 Bessel functions, p = 6). NequIP's ``correlation`` > 1 adds MACE-style
density products to each layer (see mlip.models.nequip); every preset is plain NequIP (1).
"""

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
    if family not in PRESETS:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(PRESETS)}")
    if preset not in PRESETS[family]:
        raise ValueError(f"unknown preset {preset!r} for {family}; choose one of {sorted(PRESETS[family])}")
    params = dict(PRESETS[family][preset])
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"unknown {family} hyperparameter(s) {unknown}; known: {sorted(params)}")
    params.update(overrides)
    return params
