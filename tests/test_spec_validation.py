"""Every declaration error (SpecError) and call error (CallError), each with its message."""
from __future__ import annotations

import re
import uuid
import warnings

import pytest
import sympy
import torch

import mixforge as mf
from mixforge import Bonus, CallError, Input, Mixer, Param, SpecError, h, s, t, value
from mixforge.functions import exp, logsigmoid, sigmoid, silu, softplus
from mixforge.spec import UndecidedDecayWarning
from mixforge.spec.functions import ELEMENTWISE
from mixforge.spec.testing import random_inputs

q, k, a = Input("q"), Input("k"), Input("a")
v, g = Input("v", dim="value"), Input("g", dim="value")
d = Input("d", dim=None)
u = Param("u")
pv = Param("pv", dim="value")
ph = Param("ph", dim=None)
F64 = torch.float64


def mixer(**kw):
    base = dict(fq=q, fk=k, fv=v)
    base.update(kw)
    return Mixer("m", **base)


# --------------------------------------------------------------------------- symbols and classes

def test_undefined_symbol():
    with pytest.raises(SpecError, match=r"fq uses the undefined symbol x; declare it with Input\('x'\)"):
        mixer(fq=q * sympy.Symbol("x"))


def test_foreign_index_symbol():
    with pytest.raises(SpecError, match="fa uses a symbol named h that is not mixforge.h"):
        mixer(fa=-sympy.Symbol("h") - 1)


def test_bonus_symbols_outside_bonus():
    with pytest.raises(SpecError, match="fv uses value, which is defined only inside Bonus.term"):
        mixer(fv=v * value)
    with pytest.raises(SpecError, match="fq uses s, which is defined only inside Bonus.term"):
        mixer(fq=q * s)


def test_per_value_input_in_decay():
    with pytest.raises(SpecError, match=re.escape("fa uses v, a per-value input; the decay must be per key or scalar")):
        mixer(fa=-exp(v))


def test_per_value_param_in_decay():
    with pytest.raises(SpecError, match=re.escape("fa uses pv, a per-value parameter; the decay must be per key or scalar")):
        mixer(fa=logsigmoid(pv))


@pytest.mark.parametrize("where", ["fv", "fg"])
def test_per_key_input_in_value_maps(where):
    with pytest.raises(SpecError, match=rf"{where} uses a, a per-key input; {where} must be per value or scalar"):
        mixer(**{where: sigmoid(a)})


@pytest.mark.parametrize("where", ["fq", "fk"])
def test_per_value_input_in_key_maps(where):
    with pytest.raises(SpecError, match=rf"{where} uses g, a per-value input; {where} must be per key or scalar"):
        mixer(**{where: silu(g)})


def test_map_mixing_key_and_value():
    with pytest.raises(SpecError, match="fq mixes per-key q and per-value v; a map is either per key or per value"):
        mixer(fq=q * v)


def test_scalar_and_constant_classes_are_allowed_everywhere():
    m = mixer(fq=sigmoid(d) * q, fk=k * ph, fv=v * sigmoid(d), fa=-softplus(d) * exp(ph), fg=sigmoid(d))
    assert m.classes == {"fq": "key", "fk": "key", "fv": "value", "fa": "scalar", "fg": "scalar"}
    assert m.decay_kind == "scalar"
    assert mixer(fa=-exp(ph)).decay_kind == "constant"
    assert mixer(fa=log1p_h()).decay_kind == "constant"
    assert mixer(fa=logsigmoid(a)).decay_kind == "key"
    assert mixer().decay_kind == "none"
    assert mixer(fa=0, fg=1).maps.keys() == {"fq", "fk", "fv"}


def log1p_h():
    from mixforge.functions import log1p
    return log1p(-2 ** (-5 - h))


# --------------------------------------------------------------------------- node types

@pytest.mark.parametrize("expr, match", [
    (lambda: sympy.Sum(q, (t, 0, 3)), r"fq uses Sum \(.*\), which is not elementwise"),
    (lambda: sympy.Integral(q, t), r"fq uses Integral \(.*\), which is not elementwise"),
    (lambda: sympy.Derivative(q * t, t, evaluate=False), r"fq uses Derivative .*not elementwise"),
    (lambda: q > 0, "fq is a StrictGreaterThan, not an elementwise expression"),
    (lambda: sympy.Eq(q, k), "fq is a Equality, not an elementwise expression"),
    (lambda: sympy.Max(q, 0), r"fq uses Max \(.*\), which is not elementwise"),
    (lambda: sympy.Matrix([q]), "fq must be a sympy expression of Inputs and Params"),
    (lambda: q * sympy.zoo, r"fq uses ComplexInfinity \(zoo\), which is not elementwise"),
    (lambda: q + sympy.nan, "fq contains the non-finite constant nan"),
    (lambda: q + sympy.oo, "fq contains the non-finite constant"),
    (lambda: "q", "fq must be a sympy expression of Inputs and Params"),
    (lambda: True, "fq must be a sympy expression or a number, got True"),
])
def test_non_elementwise(expr, match):
    with pytest.raises(SpecError, match=match):
        mixer(fq=expr())


@pytest.mark.parametrize("f", [sympy.gamma, sympy.erf, sympy.atan, sympy.floor, sympy.sign])
def test_function_not_printable(f):
    with pytest.raises(SpecError, match=rf"fk uses the function {f.__name__}, which mixforge cannot print to Triton; supported: .*sigmoid"):
        mixer(fk=f(k))


def test_piecewise_is_not_offered_for_declarations():
    with pytest.raises(SpecError, match="fq uses the function Piecewise, which mixforge cannot print"):
        mixer(fq=sympy.Piecewise((q, q > 0), (0, True)))


@pytest.mark.parametrize("name", ["f", "sigmoid", "exp"])
def test_undefined_function(name):
    """An undefined sympy Function is rejected even when it borrows a supported function's name."""
    with pytest.raises(SpecError, match=f"fq uses the undefined function {name}; use mixforge.functions"):
        mixer(fq=sympy.Function(name)(q))


def test_undefined_function_in_bonus():
    with pytest.raises(SpecError, match="Bonus.term uses the undefined function f"):
        Bonus(weight=u, term=sympy.Function("f")(s) * value)


# --------------------------------------------------------------------------- names

def test_duplicate_name_key_and_value():
    with pytest.raises(SpecError, match=r"the name q is declared twice: Input\('q', dim='key'\) in fq and "
                                        r"Input\('q', dim='value'\) in fv"):
        mixer(fv=Input("q", dim="value"))


def test_duplicate_name_input_and_param():
    with pytest.raises(SpecError, match="the name u is declared twice"):
        mixer(fk=k * Input("u"), bonus=Bonus(weight=u))


def test_duplicate_name_grouped_and_not():
    with pytest.raises(SpecError, match="the name q is declared twice"):
        mixer(fk=Input("q", grouped=True))


@pytest.mark.parametrize("name", ["scale", "h", "t", "s", "value", "state", "initial_state", "cu_seqlens",
                                  "output_final_state", "tl", "torch", "triton", "math", "_private"])
def test_reserved_names(name):
    with pytest.raises(SpecError, match=f"Input name {name!r} is reserved; choose another name"):
        Input(name)
    with pytest.raises(SpecError, match=f"Param name {name!r} is reserved"):
        Param(name)


@pytest.mark.parametrize("name", sorted(ELEMENTWISE) + ["pi", "E", "Float", "Integer"])
def test_names_of_the_expression_language_are_reserved(name):
    """An input named exp or pi would shadow the function or constant when a map is parsed or evaluated."""
    with pytest.raises(SpecError, match="reserved"):
        Input(name)


@pytest.mark.parametrize("name", ["1q", "q-k", "q k", "", "for", "lambda", "q.k", 3, None])
def test_non_identifier_names(name):
    with pytest.raises(SpecError, match="is not a Python identifier"):
        Input(name)


def test_bad_dim():
    with pytest.raises(SpecError, match="Input 'q': dim must be 'key', 'value' or None, got 'keys'"):
        Input("q", dim="keys")
    with pytest.raises(SpecError, match="Param 'u': dim must be"):
        Param("u", dim=2)


@pytest.mark.parametrize("dim", ["value", None])
def test_grouped_must_be_per_key(dim):
    with pytest.raises(SpecError, match=f"Input 'x': only per-key inputs can be grouped, got dim={dim!r}"):
        Input("x", dim=dim, grouped=True)


def test_bad_mixer_name():
    with pytest.raises(SpecError, match="Mixer name must be a non-empty string"):
        Mixer("my mixer", fq=q, fk=k, fv=v)
    with pytest.raises(SpecError, match="Mixer name must be"):
        Mixer("", fq=q, fk=k, fv=v)


@pytest.mark.parametrize("missing", ["fq", "fk", "fv"])
def test_required_maps(missing):
    kw = dict(fq=q, fk=k, fv=v)
    kw[missing] = None
    with pytest.raises(SpecError, match=f"{missing} is required"):
        Mixer("m", **kw)


# --------------------------------------------------------------------------- bonus

@pytest.mark.parametrize("weight", [ph, Param("w", dim="value"), 2, exp(ph)])
def test_bonus_needs_per_key_weight(weight):
    with pytest.raises(SpecError, match="must be per key .*a bonus needs a per-key weight"):
        Bonus(weight=weight)


def test_bonus_weight_must_be_a_parameter():
    with pytest.raises(SpecError, match="Bonus.weight a must be a parameter .*not an input"):
        Bonus(weight=a)
    with pytest.raises(SpecError, match="must be a parameter"):
        Bonus(weight=u * sigmoid(d))
    with pytest.raises(SpecError, match="must be a parameter"):
        Bonus(weight=u * t)


@pytest.mark.parametrize("term", [s * value * v, s * value + a, s * u])
def test_bonus_term_operands(term):
    with pytest.raises(SpecError, match="Bonus.term uses .*; the term may use s, value and per-head or per-value parameters only"):
        Bonus(weight=u, term=term)


def test_bonus_term_undefined_symbol():
    with pytest.raises(SpecError, match="Bonus.term uses the undefined symbol z"):
        Bonus(weight=u, term=sympy.Symbol("z") * value)


def test_bonus_must_be_a_bonus():
    with pytest.raises(SpecError, match="bonus must be a mixforge.Bonus, got Param"):
        mixer(bonus=u)


def test_bonus_linear_coefficient():
    assert Bonus(weight=u).linear_coefficient == s
    assert Bonus(weight=u, term=sigmoid(s * value)).linear_coefficient is None
    assert Bonus(weight=u, term=s * value + 1).linear_coefficient is None
    assert Bonus(weight=u, term=value * pv * s).linear_coefficient == s * pv


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_normalize_and_norm(norm):
    with pytest.raises(SpecError, match=f"normalize=True and norm='{norm}' together.*choose one"):
        mixer(normalize=True, norm=norm)


@pytest.mark.parametrize("norm", ["RMS", "group", 1, True])
def test_bad_norm(norm):
    with pytest.raises(SpecError, match=r"norm must be None, 'rms' or 'layer', got"):
        mixer(norm=norm)


@pytest.mark.parametrize("scale", [0, -1.0, "0.5", True, float("nan"), float("inf"), [1.0]])
def test_bad_scale(scale):
    with pytest.raises(SpecError, match="scale must be a positive number or None"):
        mixer(scale=scale)


@pytest.mark.parametrize("opt", ["normalize", "inclusive"])
def test_bool_options(opt):
    with pytest.raises(SpecError, match=f"{opt} must be True or False, got 1"):
        mixer(**{opt: 1})


# --------------------------------------------------------------------------- decay sign

@pytest.mark.parametrize("fa", [exp(a), softplus(d), 1, sympy.Rational(1, 2) + sigmoid(a)])
def test_decay_provably_positive(fa):
    with pytest.raises(SpecError, match="is positive; fa is the log of the decay and must be <= 0"):
        mixer(fa=fa)


@pytest.mark.parametrize("fa", [logsigmoid(a) / 16, -exp(a), -softplus(d) * exp(ph), -a ** 2, log1p_h(),
                                logsigmoid(a) - exp(d), -sympy.Rational(1, 3)])
def test_provable_decays_do_not_warn(fa):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixer(fa=fa)


def test_undecided_decay_warns_exactly_once():
    # a unique constant keeps the warning from having been issued by another test
    c = Param("c" + uuid.uuid4().hex[:8], dim=None)
    with pytest.warns(UndecidedDecayWarning) as rec:
        Mixer("m", fq=q, fk=k, fv=v, fa=a * c)          # this line is what the warning must point at
    ours = [w for w in rec if issubclass(w.category, UndecidedDecayWarning)]
    assert len(ours) == 1
    assert re.search(r"sympy cannot prove fa = .* <= 0", str(ours[0].message))
    assert (ours[0].filename, ours[0].lineno) == (__file__, test_undecided_decay_warns_exactly_once.__code__.co_firstlineno + 4), \
        "the warning must point at the declaration"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixer(fa=a * c)        # the same decay again: no second warning


# --------------------------------------------------------------------------- call errors

def gla_inputs(**kw):
    return random_inputs(mf.zoo.gla, B=2, T=5, H=2, K=8, V=4, dtype=F64, seed=0, **kw)


def test_missing_input():
    x = gla_inputs()
    del x["g"]
    with pytest.raises(CallError, match="missing input 'g': mixer 'gla' takes q, k, v, a, g"):
        mf.reference(mf.zoo.gla, **x)


def test_none_counts_as_missing():
    x = gla_inputs()
    x["a"] = None
    with pytest.raises(CallError, match="missing input 'a'"):
        mf.reference(mf.zoo.gla, **x)


def test_unexpected_input():
    x = gla_inputs()
    x["w"] = x["a"]
    with pytest.raises(CallError, match="unexpected input 'w': mixer 'gla' takes q, k, v, a, g"):
        mf.reference(mf.zoo.gla, **x)


def test_wrong_shape_names_argument_and_expected_shape():
    x = gla_inputs()
    x["k"] = torch.randn(2, 5, 2, 7, dtype=F64)
    with pytest.raises(CallError, match=re.escape("k: expected shape [B, T, H, K] = [2, 5, 2, 8] (K = 8 from q), got [2, 5, 2, 7]")):
        mf.reference(mf.zoo.gla, **x)


def test_no_silent_broadcast_of_key_dim():
    x = gla_inputs()
    x["a"] = torch.randn(2, 5, 2, 1, dtype=F64)
    with pytest.raises(CallError, match=re.escape("a: expected shape [B, T, H, K] = [2, 5, 2, 8]")):
        mf.reference(mf.zoo.gla, **x)
    with pytest.raises(CallError, match="a: expected shape"):
        mf.attention_map(mf.zoo.gla, **x)


def test_no_silent_broadcast_of_batch_or_time():
    x = gla_inputs()
    x["g"] = torch.randn(1, 5, 2, 4, dtype=F64)
    with pytest.raises(CallError, match=re.escape("g: expected shape [B, T, H, V] = [2, 5, 2, 4] (B = 2 from q), got [1, 5, 2, 4]")):
        mf.reference(mf.zoo.gla, **x)
    x = gla_inputs()
    x["v"] = torch.randn(2, 1, 2, 4, dtype=F64)
    with pytest.raises(CallError, match=r"v: expected shape \[B, T, H, V\] .*\(T = 5 from q\)"):
        mf.reference(mf.zoo.gla, **x)


def test_parameter_shape():
    x = random_inputs(mf.zoo.rwkv6, B=1, T=4, H=2, K=8, V=4, dtype=F64, seed=0)
    x["u"] = torch.randn(2, 1, dtype=F64)
    with pytest.raises(CallError, match=re.escape("u: expected shape [H, K] = [2, 8] (K = 8 from r), got [2, 1]")):
        mf.reference(mf.zoo.rwkv6, **x)
    x["u"] = torch.randn(8, dtype=F64)
    with pytest.raises(CallError, match=re.escape("u: expected 2 dims [H, K], got shape [8]")):
        mf.reference(mf.zoo.rwkv6, **x)


def test_grouped_count_must_divide_heads():
    x = random_inputs(mf.zoo.mamba2, B=1, T=4, H=4, K=4, V=3, G=2, dtype=F64, seed=0)
    x["B"] = torch.randn(1, 4, 3, 4, dtype=F64)
    x["C"] = torch.randn(1, 4, 3, 4, dtype=F64)
    with pytest.raises(CallError, match=r"C: the group count 3 \(dim 2\) must divide the number of heads H = 4"):
        mf.reference(mf.zoo.mamba2, **x)


def test_wrong_ndim():
    x = gla_inputs()
    x["q"] = x["q"][0]
    with pytest.raises(CallError, match=re.escape("q: expected 4 dims [B, T, H, K], got shape [5, 2, 8]")):
        mf.reference(mf.zoo.gla, **x)
    x = random_inputs(mf.zoo.mamba2, B=1, T=4, H=2, K=4, V=3, dtype=F64, seed=0)
    x["dt"] = x["dt"][..., None]
    with pytest.raises(CallError, match=re.escape("dt: expected 3 dims [B, T, H], got shape [1, 4, 2, 1]")):
        mf.reference(mf.zoo.mamba2, **x)


def test_dtype_mismatch_between_inputs():
    x = gla_inputs()
    x["v"] = x["v"].float()
    with pytest.raises(CallError, match="v: dtype torch.float32 differs from the other inputs' torch.float64; pass all inputs in one dtype"):
        mf.reference(mf.zoo.gla, **x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_tensor(dtype):
    x = gla_inputs()
    x["k"] = torch.ones(2, 5, 2, 8, dtype=dtype)
    with pytest.raises(CallError, match=f"k: expected a floating-point tensor, got {dtype}"):
        mf.reference(mf.zoo.gla, **x)


def test_complex_tensor_is_not_floating():
    x = gla_inputs()
    x["k"] = torch.ones(2, 5, 2, 8, dtype=torch.complex128)
    with pytest.raises(CallError, match="k: expected a floating-point tensor"):
        mf.reference(mf.zoo.gla, **x)


def test_not_a_tensor():
    x = gla_inputs()
    x["q"] = x["q"].numpy()
    with pytest.raises(CallError, match="q: expected a torch.Tensor, got ndarray"):
        mf.reference(mf.zoo.gla, **x)


def test_device_mismatch():
    """A tensor on another device (the meta device exists on every build) is refused before any work."""
    x = gla_inputs()
    x["g"] = torch.empty(2, 5, 2, 4, dtype=F64, device="meta")
    with pytest.raises(CallError, match="g: expected device cpu like q, got meta"):
        mf.reference(mf.zoo.gla, **x)


def test_bad_scale_at_call():
    x = gla_inputs()
    for bad in (0, -1.0, float("inf"), "1"):
        with pytest.raises(CallError, match="scale: expected a positive"):
            mf.reference(mf.zoo.gla, scale=bad, **x)


# --------------------------------------------------------------------------- cu_seqlens and state

def varlen_inputs(B=1, T=9):
    return random_inputs(mf.zoo.gla, B=B, T=T, H=2, K=8, V=4, dtype=F64, seed=0)


@pytest.mark.parametrize("cu, match", [
    ([0, 5, 3, 9], re.escape("cu_seqlens: must be non-decreasing, but entry 2 (3) < entry 1 (5)")),
    ([0, 4, 8], "cu_seqlens: must end at T = 9, got 8"),
    ([0, 4, 10], "cu_seqlens: must end at T = 9, got 10"),
    ([1, 4, 9], "cu_seqlens: must start at 0, got 1"),
    ([0], r"cu_seqlens: expected at least 2 entries \[0, ..., T\], got 1"),
])
def test_cu_seqlens_values(cu, match):
    with pytest.raises(CallError, match=match):
        mf.reference(mf.zoo.gla, cu_seqlens=torch.tensor(cu), **varlen_inputs())


def test_cu_seqlens_with_batch():
    with pytest.raises(CallError, match="cu_seqlens: varlen batches need B = 1 .*got B = 2"):
        mf.reference(mf.zoo.gla, cu_seqlens=torch.tensor([0, 4, 9]), **varlen_inputs(B=2))


@pytest.mark.parametrize("cu", [torch.tensor([0.0, 4.0, 9.0]), torch.tensor([[0, 4, 9]]), [0, 4, 9]])
def test_cu_seqlens_type(cu):
    with pytest.raises(CallError, match="cu_seqlens: expected a 1-D"):
        mf.reference(mf.zoo.gla, cu_seqlens=cu, **varlen_inputs())


def test_cu_seqlens_in_attention_map_is_checked_too():
    with pytest.raises(CallError, match="cu_seqlens: must end at T = 9"):
        mf.attention_map(mf.zoo.gla, cu_seqlens=torch.tensor([0, 4]), **varlen_inputs())


def test_initial_state_shape():
    x = gla_inputs()
    with pytest.raises(CallError, match=re.escape("initial_state: expected shape [N, H, K, V] = [2, 2, 8, 4], got [2, 2, 4, 8]")):
        mf.reference(mf.zoo.gla, initial_state=torch.zeros(2, 2, 4, 8, dtype=F64), **x)
    with pytest.raises(CallError, match=re.escape("initial_state: expected shape [N, H, K, V] = [3, 2, 8, 4], got [2, 2, 8, 4]")):
        mf.reference(mf.zoo.gla, initial_state=torch.zeros(2, 2, 8, 4, dtype=F64),
                     cu_seqlens=torch.tensor([0, 4, 4, 9]), **varlen_inputs())


def test_initial_state_dtype_and_type():
    x = gla_inputs()
    with pytest.raises(CallError, match="initial_state: expected dtype .*float32.*got torch.float16"):
        mf.reference(mf.zoo.gla, initial_state=torch.zeros(2, 2, 8, 4, dtype=torch.float16), **x)
    with pytest.raises(CallError, match=r"initial_state: expected a tensor of shape \[2, 2, 8, 4\], got list"):
        mf.reference(mf.zoo.gla, initial_state=[[0.0]], **x)


def test_normalize_state_is_a_pair():
    m = mf.zoo.linear_attention
    x = random_inputs(m, B=2, T=5, H=2, K=8, V=4, dtype=F64, seed=0)
    with pytest.raises(CallError, match=re.escape("initial_state: mixer 'linear_attention' normalizes, so its state is a pair "
                                                  "(S [N, H, K, V], z [N, H, K]) = [[2, 2, 8, 4], [2, 2, 8]]")):
        mf.reference(m, initial_state=torch.zeros(2, 2, 8, 4, dtype=F64), **x)
    with pytest.raises(CallError, match=re.escape("initial_state[1] (z): expected shape [N, H, K] = [2, 2, 8], got [2, 2, 4]")):
        mf.reference(m, initial_state=(torch.zeros(2, 2, 8, 4, dtype=F64), torch.zeros(2, 2, 4, dtype=F64)), **x)
    with pytest.raises(CallError, match=re.escape("initial_state[0] (S): expected shape")):
        mf.reference(m, initial_state=(torch.zeros(2, 2, 8, dtype=F64), torch.zeros(2, 2, 8, dtype=F64)), **x)
