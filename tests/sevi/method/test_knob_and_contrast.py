"""The conservativeness mapping (spec section 5) and the contrastive-decoding step (spec section 3)."""

from __future__ import annotations

import ast
import math
from collections import Counter

import pytest
import torch

from sevi.method.contrastive import contrast_logits, jensen_shannon
from sevi.method.knob import AlignmentParamError, omega_for, resolve_alignment
from tests.support.repo import REPO


def test_mapping_endpoints_and_presets() -> None:
    off = resolve_alignment(0, 32)
    assert off.omega == 0 and not off.active and not off.contrast
    bal = resolve_alignment("balanced", 32)
    assert (bal.omega, bal.start_layer, bal.kappa, bal.contrast) == (0.5, 8, 0.2, True)
    foc = resolve_alignment("Focused", 32)
    assert (foc.omega, foc.start_layer, foc.kappa) == (4.0, 4, 0.2)
    assert resolve_alignment("off", 32) == off
    assert resolve_alignment(None, 32, default_conservativeness=0.5) == bal


def test_mapping_is_monotone_and_continuous() -> None:
    cs = [i / 200 for i in range(201)]
    params = [resolve_alignment(c, 32) for c in cs]
    omegas = [p.omega for p in params]
    assert all(b > a for a, b in zip(omegas, omegas[1:], strict=False))
    assert all(b.start_layer <= a.start_layer for a, b in zip(params, params[1:], strict=False))
    # No jumps: omega is continuous at the joint (c = 0.5).
    assert math.isclose(omega_for(0.5 - 1e-9), omega_for(0.5), abs_tol=1e-6)
    assert params[-1].start_layer == 4 and params[100].start_layer == 8


def test_overrides_win() -> None:
    p = resolve_alignment(0.5, 32, omega=2.0, start_layer=3, kappa=0.6, contrast=False)
    assert (p.conservativeness, p.omega, p.start_layer, p.kappa, p.contrast) == (0.5, 2.0, 3, 0.6, False)
    assert resolve_alignment(0, 32, omega=1.0).active


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"conservativeness": 1.5}, "conservativeness"),
        ({"conservativeness": -0.1}, "conservativeness"),
        ({"conservativeness": float("nan")}, "conservativeness"),
        ({"conservativeness": "cautious"}, "conservativeness"),
        ({"conservativeness": True}, "conservativeness"),
        ({"conservativeness": 0.5, "omega": -1.0}, "omega"),
        ({"conservativeness": 0.5, "start_layer": 33}, "start_layer"),
        ({"conservativeness": 0.5, "start_layer": 2.5}, "start_layer"),
        ({"conservativeness": 0.5, "kappa": 1.5}, "kappa"),
    ],
)
def test_bad_values_raise_with_param(kwargs: dict, param: str) -> None:
    c = kwargs.pop("conservativeness")
    with pytest.raises(AlignmentParamError) as info:
        resolve_alignment(c, 32, **kwargs)
    assert info.value.param == param


def test_contrast_formula_on_hand_made_logits() -> None:
    a = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    b = torch.tensor([[0.0, 2.0, 0.0, -3.0]])
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    m = (p + q) / 2
    jsd = 0.5 * float((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    assert math.isclose(float(jensen_shannon(a, b)), jsd, rel_tol=1e-5)
    alpha = min(3.0, 1 - math.log10(min(1.0, jsd)))
    out = contrast_logits(a, b)
    expected = (1 + alpha) * a - alpha * b
    # Plausibility cut at log(0.1) + max(a) = 2 - 2.303 = -0.303: only token 3 (a = -3) is cut.
    assert torch.isinf(out[0, 3]) and not torch.isinf(out[0, :3]).any()
    torch.testing.assert_close(out[0, :3], expected[0, :3])


def test_contrast_keeps_main_logits_when_distributions_agree() -> None:
    a = torch.tensor([[3.0, 2.5, -1.0]])
    out = contrast_logits(a, a.clone())
    assert torch.equal(out[0, :2], a[0, :2])  # d = 0 <= threshold: logits = a, then the cut
    assert torch.isinf(out[0, 2])


def test_contrast_alpha_is_capped() -> None:
    a = torch.tensor([[1.0, 0.9, 0.0]])
    b = a + torch.tensor([[0.0, 0.2, 0.0]])
    d = float(jensen_shannon(a, b))
    assert 1e-4 < d < 1e-2  # so 1 - log10(d) > 3 and alpha is capped at alpha_max = 3
    out = contrast_logits(a, b)
    torch.testing.assert_close(out[0, :2], (4 * a - 3 * b)[0, :2])


# Where a request's knob becomes numbers: once per request on each route, where the request enters.
RESOLVING_ROUTES = {
    "server/intake.py": 1,  # sevi-serve's HTTP routes and the batch command (through intake.resolve_knobs)
    "sevi/engines/vllm/plugin/params.py": 1,  # `vllm serve`: the front end's validate_params (resolve_front_end)
    "sevi/engines/reference/generate.py": 1,  # the reference engine's CLI
}


def test_the_knob_is_resolved_in_one_place_per_route() -> None:
    """No scheduler, worker, backend or engine resolves a knob again: they read the numbers they were given."""
    calls: Counter[str] = Counter()
    for package in ("sevi", "server"):
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    if name == "resolve_alignment":
                        calls[str(path.relative_to(REPO))] += 1
    assert dict(calls) == RESOLVING_ROUTES
