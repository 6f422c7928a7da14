import inspect

import flexlora


def test_every_public_name_resolves_and_is_documented():
    for name in flexlora.__all__:
        obj = getattr(flexlora, name)
        if name == "__version__":
            assert isinstance(obj, str) and obj.count(".") == 2
            continue
        assert not inspect.ismodule(obj), f"flexlora.{name} is a module, expected the function/class"
        assert inspect.getdoc(obj), f"flexlora.{name} has no docstring"


def test_unknown_attribute_is_an_attribute_error():
    try:
        flexlora.not_a_name
    except AttributeError as e:
        assert "not_a_name" in str(e)
    else:
        raise AssertionError("flexlora.not_a_name should raise AttributeError")
