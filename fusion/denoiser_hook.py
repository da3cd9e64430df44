"""The engine's entry into a denoiser: a diffusers :class:`~diffusers.hooks.ModelHook` in the model's
:class:`~diffusers.hooks.HookRegistry`, so it stacks with diffusers' own hooks (caches, layerwise casting, group
offloading) and with accelerate's (cpu offload), in whichever order they were added.

While an engine is attached the hook hands every call to it (:meth:`DenoiserHook.new_forward`); detached, it is a
pass-through. :func:`detach` removes the hook from the registry when that leaves every other hook in place —
nothing wrapped the forward after us, or diffusers hooks registered after ours (the registry relinks them) — and
otherwise leaves it in as a pass-through, because taking it out would drop the hooks wrapped around it.

Wrappers that re-install themselves from a forward captured before the hook existed drop it from the call path
(diffusers' model cpu offload removes and re-adds accelerate's hooks after every pipeline call, restoring the
forward accelerate first wrapped). :func:`reroute` (the mixin calls it at every pipeline call) puts it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from fusion.errors import CompositionError

HOOK_NAME = "lora_composer"
"""The hook's name in the denoiser's HookRegistry."""

Route = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
"""``route(forward, args, kwargs)``: what the attached engine does with one denoiser call."""


class DenoiserHook(ModelHook):
    """Routes the denoiser's calls to ``route`` while one is set; calls the wrapped forward otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.route: Route | None = None
        self.installed_forward: Any = None
        self.created_registry = False
        self.had_instance_forward = False

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The hooked forward: the engine's route, or the wrapped forward when none is attached."""
        forward = self.fn_ref.original_forward
        route = self.route
        if route is None:
            return forward(*args, **kwargs)
        return route(forward, args, kwargs)


def attach(denoiser: nn.Module, route: Route) -> DenoiserHook:
    """Route ``denoiser``'s calls to ``route`` (reusing a pass-through hook left by an earlier engine)."""
    created = not hasattr(denoiser, "_diffusers_hook")
    had_instance_forward = "forward" in denoiser.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    hook = registry.get_hook(HOOK_NAME)
    if hook is None:
        hook = DenoiserHook()
        hook.created_registry = created
        hook.had_instance_forward = had_instance_forward
        registry.register_hook(hook, HOOK_NAME)
        hook.installed_forward = denoiser.__dict__.get("forward")
    elif hook.route is not None:
        raise CompositionError(
            f"another FusionEngine is attached to this {type(denoiser).__name__}",
            hint="clear that engine (or the pipeline's composition) first",
        )
    hook.route = route
    return hook


def detach(denoiser: nn.Module, hook: DenoiserHook) -> None:
    """Stop routing; take the hook out of the registry when no other hook depends on its place."""
    hook.route = None
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is not hook:
        return
    last = registry._hook_order[-1] == HOOK_NAME
    if last and denoiser.__dict__.get("forward") is not hook.installed_forward:
        return  # something (accelerate) wrapped our forward: stay in as a pass-through
    registry.remove_hook(HOOK_NAME, recurse=False)
    if hook.created_registry and not registry.hooks:
        del denoiser._diffusers_hook
        forward = denoiser.__dict__.get("forward")
        if not hook.had_instance_forward and getattr(forward, "__func__", None) is type(denoiser).forward:
            del denoiser.forward


def routes(denoiser: nn.Module, hook: DenoiserHook) -> bool:
    """Whether the denoiser's forward still calls through ``hook``: diffusers hooks registered after it (the registry
    links them to it), the forward the registry installed for it, or accelerate's wrapper around that forward."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is not hook:
        return False
    if registry._hook_order[-1] != HOOK_NAME:
        return True
    state = denoiser.__dict__
    if state.get("forward") is hook.installed_forward:
        return True
    return "_hf_hook" in state and state.get("_old_forward") is hook.installed_forward


def reroute(denoiser: nn.Module, hook: DenoiserHook) -> None:
    """Put ``hook`` back in the call path (around the current forward) if a wrapper dropped it."""
    if routes(denoiser, hook):
        return
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    current = denoiser.forward
    if registry.get_hook(HOOK_NAME) is hook:
        registry.remove_hook(HOOK_NAME, recurse=False)
        denoiser.forward = current  # removal re-installs the stale forward the hook had wrapped
    registry.register_hook(hook, HOOK_NAME)
    hook.installed_forward = denoiser.__dict__.get("forward")
