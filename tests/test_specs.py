"""The probe spec grammar: [TARGET:]PROVIDER:NAME[(TYPE,...)], table-tested and fuzzed."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdtrace.discovery.specs import ARGUMENT_TYPES, parse_spec
from sdtrace.errors import SdtraceError


@pytest.mark.parametrize("text, target, provider, name, types", [
    ("python:function__entry", None, "python", "function__entry", ()),
    ("libpython3.11:python:gc*", "libpython3.11", "python", "gc*", ()),
    ("/usr/bin/python3.11", "/usr/bin/python3.11", "*", "*", ()),
    ("/usr/bin/python3.11:python:*", "/usr/bin/python3.11", "python", "*", ()),
    ("conform:strings(str,str)", None, "conform", "strings", ("str", "str")),
    ("p:n(,str)", None, "p", "n", (None, "str")),
    ("p:n( u8 , s64 )", None, "p", "n", ("u8", "s64")),
    ("libc:*:*", "libc", "*", "*", ()),
    # the forms bpftrace users type: FILE::NAME, FILE:NAME, FILE:*, a glob of files
    ("/usr/bin/python3.11::function__entry", "/usr/bin/python3.11", "*", "function__entry", ()),
    ("/usr/bin/python3.11:*", "/usr/bin/python3.11", "*", "*", ()),
    ("./a.out:probe(str)", "./a.out", "*", "probe", ("str",)),
    ("libpython3.11.so.1.0:gc*", "libpython3.11.so.1.0", "*", "gc*", ()),
    ("/usr/lib/*/libfoo*.so:*:*", "/usr/lib/*/libfoo*.so", "*", "*", ()),
    ("/usr/lib/*/libfoo*.so", "/usr/lib/*/libfoo*.so", "*", "*", ()),
    ("libc:memory_*", None, "libc", "memory_*", ()),     # no / nor .: a provider
])
def test_specs(text, target, provider, name, types):
    spec = parse_spec(text)
    assert (spec.target, spec.provider, spec.name, spec.types) == (target, provider, name, types)


@pytest.mark.parametrize("text, words", [
    ("", "empty probe spec"),
    ("p:n(str", "'(' without ')'"),
    ("p:n)", "')' without '('"),
    ("p:n(bogus)", "unknown argument type 'bogus'"),
    (":p:n", "expected [TARGET:]PROVIDER:NAME"),
    ("p:", "expected [TARGET:]PROVIDER:NAME"),
    ("::n", "expected [TARGET:]PROVIDER:NAME"),
    ("./a.out:", "expected [TARGET:]PROVIDER:NAME"),
])
def test_bad_specs_name_the_spec_and_the_cause(text, words):
    with pytest.raises(SdtraceError) as error:
        parse_spec(text)
    message = str(error.value)
    assert words in message and "\n" not in message


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(list("ab*?:/(),. _") + ["str", "u8", "s64", "\n"]),
                max_size=20).map("".join) | st.text(max_size=60))
def test_any_text_is_a_spec_or_one_clean_error(text):
    try:
        spec = parse_spec(text)
    except SdtraceError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert spec.provider and spec.name
    assert all(kind is None or kind in ARGUMENT_TYPES for kind in spec.types)


FILES = st.lists(st.sampled_from(list("ab*?/._-[]") + ["lib", "x.so"]), min_size=1,
                 max_size=12).map("".join).filter(lambda text: "/" in text)
GLOBS = st.lists(st.sampled_from(list("ab_*?") + ["[ab]"]), min_size=1, max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(FILES, GLOBS, GLOBS)
def test_file_forms_name_a_file_and_any_provider(file, provider, name):
    assert parse_spec(f"{file}::{name}")[1:4] == (file, "*", name)
    assert parse_spec(f"{file}:{name}")[1:4] == (file, "*", name)
    assert parse_spec(f"{file}:{provider}:{name}")[1:4] == (file, provider, name)
    assert parse_spec(file)[1:4] == (file, "*", "*")
