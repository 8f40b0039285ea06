"""The registry: handlers, signal handlers and hooks, refused once the server runs."""

from __future__ import annotations

import signal
from typing import Any

import pytest

import passrpc
from passrpc import ConfigurationError
from passrpc._registry import HOOKS, Registry, parse_signal


def _registry(running: bool = False) -> Registry:
    return Registry(running=lambda: running)


class TestHandlers:
    def test_a_name_is_registered_once(self) -> None:
        """A second handler for a name raises ConfigurationError naming the first."""
        registry = _registry()
        registry.add_handler("x", print)
        with pytest.raises(ConfigurationError, match="already registered"):
            registry.add_handler("x", len)

    @pytest.mark.parametrize("name", ["", 3, None])
    def test_a_name_is_a_non_empty_str(self, name: Any) -> None:
        """An empty or non-str name raises ConfigurationError."""
        with pytest.raises(ConfigurationError, match="non-empty str"):
            _registry().add_handler(name, print)

    @pytest.mark.parametrize("frozen", [True, False])
    def test_registration_is_refused_while_running_or_frozen(self, frozen: bool) -> None:
        """Whether the server runs now or this is its process, registering says it came too late."""
        registry = _registry(running=not frozen)
        registry.frozen = frozen
        with pytest.raises(ConfigurationError, match="add_handler\\('x'\\) came after"):
            registry.add_handler("x", print)
        with pytest.raises(ConfigurationError, match="on_before_fork came after"):
            registry.add_hook("before_fork", print)

    def test_collect_finds_marked_methods(self) -> None:
        """collect() registers a subclass's @handler and @on_signal methods, bound."""

        class App:
            @passrpc.handler("greet", raw=True)
            def greet(self, channel: Any) -> None: ...

            @passrpc.on_signal("USR2")
            def reopen(self) -> None: ...

        app = App()
        registry = _registry()
        registry.collect(app)
        assert registry.handlers["greet"].raw
        assert registry.handlers["greet"].fn == app.greet
        assert registry.signal_handlers[signal.SIGUSR2] == app.reopen


class TestSignalsAndHooks:
    @pytest.mark.parametrize("sig", ["USR1", "SIGUSR1", "usr1", int(signal.SIGUSR1)])
    def test_signals_by_name_or_number(self, sig: str | int) -> None:
        """A signal is named with or without SIG, in any case, or numbered."""
        assert parse_signal(sig) == signal.SIGUSR1

    @pytest.mark.parametrize("sig", ["KILL", "STOP", "NOPE", 0])
    def test_uncatchable_or_unknown_signals_are_refused(self, sig: str | int) -> None:
        """SIGKILL, SIGSTOP and unknown signals raise ConfigurationError."""
        with pytest.raises(ConfigurationError):
            parse_signal(sig)

    def test_hooks_run_in_registration_order(self) -> None:
        """run_hooks calls each function of one hook once, in order."""
        registry = _registry()
        calls: list[str] = []
        for hook in HOOKS:
            registry.add_hook(hook, lambda hook=hook: calls.append(hook + "1"))
            registry.add_hook(hook, lambda hook=hook: calls.append(hook + "2"))
        registry.run_hooks("initialize_server")
        assert calls == ["initialize_server1", "initialize_server2"]
