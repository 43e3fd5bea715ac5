from collections import OrderedDict

import pytest

from mima.errors import ConfigError
from mima.registry import Registry, UnknownNameError


class Attack:
    pass


def make_registry() -> Registry[Attack]:
    attacks = Registry("attack", Attack)

    @attacks.register("lora")
    class LoraAttack(Attack):
        pass

    attacks.register("dreambooth", type("DreamBoothAttack", (Attack,), {}))
    return attacks


def test_decorator_and_direct_registration():
    attacks = make_registry()
    assert attacks.get("lora").__name__ == "LoraAttack"
    assert attacks.get("dreambooth").__name__ == "DreamBoothAttack"
    assert attacks.names() == ["dreambooth", "lora"]
    assert list(attacks) == ["dreambooth", "lora"]
    assert "lora" in attacks and "full" not in attacks
    assert len(attacks) == 2


def test_duplicate_name_raises():
    attacks = make_registry()
    with pytest.raises(ValueError, match="attack 'lora' is already registered"):
        attacks.register("lora", type("Other", (Attack,), {}))
    with pytest.raises(ValueError, match="already registered"):
        attacks.register("lora", "collections:OrderedDict")


def test_wrong_type_raises_type_error():
    attacks = Registry("attack", Attack)
    with pytest.raises(TypeError, match="must be a subclass of Attack"):
        attacks.register("bad", int)
    with pytest.raises(TypeError):

        @attacks.register("bad")
        class NotAnAttack:
            pass

    assert "bad" not in attacks


def test_lazy_entry_resolves_on_get():
    mappings = Registry("mapping", dict)
    mappings.register("ordered", "collections:OrderedDict")
    assert "ordered" in mappings
    assert mappings.get("ordered") is OrderedDict
    assert mappings.get("ordered") is OrderedDict


def test_lazy_entry_checked_at_resolution():
    mappings = Registry("mapping", dict)
    mappings.register("deque", "collections:deque")
    with pytest.raises(TypeError, match="must be a subclass of dict"):
        mappings.get("deque")
    with pytest.raises(ValueError, match="package.module:attr"):
        mappings.register("no_colon", "collections.OrderedDict")


def test_unknown_name_suggests_closest():
    attacks = make_registry()
    expected = r"^unknown attack 'lroa'; did you mean 'lora'\? valid: dreambooth, lora$"
    with pytest.raises(UnknownNameError, match=expected):
        attacks.get("lroa")


def test_unknown_name_without_close_match():
    attacks = make_registry()
    with pytest.raises(KeyError) as info:
        attacks.get("xyz")
    assert str(info.value) == "unknown attack 'xyz'; valid: dreambooth, lora"
    assert isinstance(info.value, ConfigError)
