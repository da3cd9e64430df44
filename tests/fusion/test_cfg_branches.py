"""Splitting a CFG batch's denoiser arguments into its unconditional and conditional halves."""

from __future__ import annotations

import pytest
import torch

from fusion.cfg_branches import batch_slice, cfg_halves, check_branches, describe_branches, resolve_branches
from fusion.errors import CompositionError


def test_halves_split_every_batch_tensor_and_keep_the_rest() -> None:
    latent = torch.arange(4.0)[:, None]
    added = {"text_embeds": torch.arange(8.0).reshape(4, 2), "time_ids": [torch.ones(4, 6)]}
    (u_args, u_kwargs), (c_args, c_kwargs) = cfg_halves(
        (latent, torch.tensor(999)),
        {"added_cond_kwargs": added, "cross_attention_kwargs": {"scale": torch.ones(4)}, "return_dict": False},
        4,
        frozenset({"cross_attention_kwargs", "return_dict"}),
    )
    assert u_args[0].flatten().tolist() == [0.0, 1.0]
    assert c_args[0].flatten().tolist() == [2.0, 3.0]
    assert int(u_args[1]) == int(c_args[1]) == 999, "a 0-d timestep is shared"
    assert c_kwargs["added_cond_kwargs"]["text_embeds"].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert c_kwargs["added_cond_kwargs"]["time_ids"][0].shape == (2, 6)
    assert u_kwargs["cross_attention_kwargs"]["scale"].shape == (4,), "kept arguments pass whole"
    assert c_kwargs["return_dict"] is False


def test_odd_batches_and_unknown_branch_names_are_refused() -> None:
    with pytest.raises(CompositionError, match="two halves"):
        cfg_halves((torch.zeros(3, 1),), {}, 3, frozenset())
    with pytest.raises(CompositionError, match="branches must be one of"):
        check_branches("unconditional")
    assert batch_slice("text", 0, 1, 2) == "text"


def test_a_per_adapter_choice_resolves_to_the_adapters_the_unconditional_half_keeps() -> None:
    names = ["style", "scene", "hero"]
    assert resolve_branches("both", names) == ("both", {})
    assert resolve_branches("conditional", names) == ("conditional", {})
    assert resolve_branches({"style": "conditional"}, names) == ("conditional", {"scene": 1.0, "hero": 1.0})
    assert resolve_branches(dict.fromkeys(names, "conditional"), names) == ("conditional", {})
    assert resolve_branches({"style": "both"}, names) == ("both", {}), "unnamed adapters act on both branches"
    with pytest.raises(CompositionError, match="outside the composition"):
        resolve_branches({"forest": "both"}, names)
    with pytest.raises(CompositionError, match="adapter 'style'"):
        resolve_branches({"style": "negative"}, names)
    with pytest.raises(CompositionError, match="a share, or a mapping"):
        resolve_branches(["style"], names)  # type: ignore[arg-type]
    assert describe_branches({"scene": "both", "style": "conditional"}) == "scene: both, style: conditional"
    assert describe_branches("conditional") == "conditional"


def test_a_share_is_the_part_of_an_adapters_weight_the_unconditional_half_carries() -> None:
    names = ["style", "scene"]
    assert resolve_branches({"style": 0.5}, names) == ("conditional", {"style": 0.5, "scene": 1.0})
    assert resolve_branches({"style": 0, "scene": 0.25}, names) == ("conditional", {"scene": 0.25})
    assert resolve_branches({"style": 1, "scene": 1.0}, names) == ("both", {}), "a share of 1 is both branches"
    for bad in (1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(CompositionError, match="share of their weight between 0 and 1"):
            resolve_branches({"style": bad}, names)  # type: ignore[dict-item]
    assert describe_branches({"style": 0.5}) == "style: 0.5"


def test_one_share_for_every_adapter() -> None:
    names = ["style", "scene"]
    assert resolve_branches(0.5, names) == ("conditional", {"style": 0.5, "scene": 0.5})
    assert resolve_branches(0, names) == ("conditional", {})
    assert resolve_branches(1.0, names) == ("both", {})
    with pytest.raises(CompositionError, match="share of their weight between 0 and 1"):
        resolve_branches(2.0, names)
    assert describe_branches(0.5) == "0.5"
