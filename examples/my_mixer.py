"""A mixer declared in a file, for the CLI:

    mixforge show examples/my_mixer.py:my_mixer
    mixforge attention-map examples/my_mixer.py:my_mixer --out my_mixer.png

GLA's per-key decay with the key tied to it (as HGRN2 and MetaLA do) and a
gated bonus on the current token: the variant `mixforge demo` declares.
"""
from mixforge import Bonus, Input, Mixer, Param, s, value
from mixforge.functions import logsigmoid, sigmoid, silu

q, a = Input("q"), Input("a")
v, g = Input("v", dim="value"), Input("g", dim="value")

my_mixer = Mixer("tied_gla", fq=q, fk=1 - sigmoid(a), fv=v, fa=logsigmoid(a) / 8, fg=silu(g), norm="rms",
                 bonus=Bonus(weight=Param("u"), term=sigmoid(s) * value))
