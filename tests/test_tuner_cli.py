"""`mixforge tune` and `mixforge cache` end to end, on the synthetic objective (the kernels are not needed)."""
import json

import pytest

import mixforge as mf
from mixforge.cli import main
from mixforge.tuner import api
from mixforge.tuner.cache import ConfigCache
from mixforge.tuner.testing import SyntheticObjective, matches


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXFORGE_CACHE_DIR", str(tmp_path / "cache"))
    made = []

    def factory(mixer, kernel, shape, dtype, **kw):
        obj = SyntheticObjective(fail=matches(num_warps=2), wrong=matches(chunk=8, BV=8))
        made.append((kernel, shape, obj))
        return obj

    monkeypatch.setattr(api, "make_objective", factory)
    return tmp_path / "cache", made


def tune_args(*extra):
    return ["tune", "gla", "--shape", "2,64,2,16,16", "--dtype", "float32", "--trials", "6", *extra]


def test_tune_twice_second_is_a_cache_hit_with_zero_trials(cache_dir, capsys):
    root, made = cache_dir
    assert main(tune_args()) == 0
    out = capsys.readouterr().out
    assert "chunk_fwd" in out and "chunk_bwd" in out and "speedup vs default" in out
    assert "12 trials run" in out
    calls = sum(len(o.calls) for _, _, o in made)
    assert calls == 12
    entries = ConfigCache(root / "tuner" / "configs.json").entries()
    assert len(entries) == 2
    # the same key again (T=60 shares T=64's bucket): no study, no trial
    assert main(["tune", "gla", "--shape", "2,60,2,16,16", "--dtype", "fp32", "--trials", "6"]) == 0
    out = capsys.readouterr().out
    assert "cache hit" in out and "0 trials run" in out
    assert sum(len(o.calls) for _, _, o in made) == calls
    # more trials than cached: the study resumes and runs only the difference
    assert main(["tune", "gla", "--shape", "2,64,2,16,16", "--dtype", "fp32", "--trials", "9",
                 "--kernels", "chunk_fwd"]) == 0
    out = capsys.readouterr().out
    assert "3 trials run" in out and "study holds 9" in out


def test_tune_table_reports_failed_and_rejected(cache_dir, capsys, tmp_path):
    root, made = cache_dir
    assert main(tune_args("--kernels", "chunk_fwd", "--grid", "--storage", f"journal:{tmp_path / 'j.log'}")) == 0
    out = capsys.readouterr().out
    (_, _, obj), = made
    fails = sum(c.num_warps == 2 for c in obj.calls)
    wrong = sum(c.chunk == 8 and c.BV == 8 and c.num_warps != 2 for c in obj.calls)  # failing ones never check
    assert fails and wrong
    row = next(line for line in out.splitlines() if "chunk_fwd" in line and "│" in line)
    cells = [c.strip() for c in row.split("│")]
    assert cells[6:9] == [str(len(obj.calls)), str(fails), str(wrong)]


def test_cache_list_json_show_export_import_clear(cache_dir, capsys, tmp_path):
    root, _ = cache_dir
    assert main(tune_args()) == 0
    capsys.readouterr()
    assert main(["cache", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(root / "tuner" / "configs.json")
    assert main(["cache", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["kernel"] for r in rows} == {"chunk_fwd", "chunk_bwd"}
    for r in rows:
        assert r["mixer"] == "gla" and r["dtype"] == "fp32" and r["device"]
        assert r["bucket"] == {"K": 16, "V": 16, "T_bucket": 64, "BH_bucket": 4}
        assert set(r["config"]) >= {"chunk", "sub_chunk", "BV", "num_warps", "num_stages", "strategy"}
        assert r["time"] > 0
    assert main(["cache", "list"]) == 0
    assert "2 tuned configs" in capsys.readouterr().out
    assert main(["cache", "show", "chunk_bwd"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown.values())[0]["key"]["kernel"] == "chunk_bwd"
    assert main(["cache", "show", "chunk"]) == 1 and "2 entries match" in capsys.readouterr().err
    assert main(["cache", "show", "nothing-like-it"]) == 1

    exported = tmp_path / "exported.json"
    assert main(["cache", "export", str(exported)]) == 0
    assert "exported 2 entries" in capsys.readouterr().out
    before = exported.read_text()
    assert main(["cache", "clear"]) == 0
    assert "removed 2" in capsys.readouterr().out
    assert main(["cache", "list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []
    assert main(["cache", "import", str(exported)]) == 0
    assert "2 added" in capsys.readouterr().out
    assert main(["cache", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert json.loads(before)["entries"] == ConfigCache(root / "tuner" / "configs.json").entries()

    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"hello": "world"}')
    assert main(["cache", "import", str(foreign)]) == 1
    assert "import rejected" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(before[: len(before) // 2])
    assert main(["cache", "import", str(corrupt)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_tune_rejects_bad_arguments(cache_dir, capsys):
    with pytest.raises(SystemExit):
        main(["tune", "gla", "--shape", "2,64,2,16,16", "--dtype", "int8"])
    assert "unknown dtype" in capsys.readouterr().err
    assert main(["tune", "gla", "--shape", "2,64,2,16"]) == 2
    assert "five" in capsys.readouterr().err
    assert main(["tune", "no_such_mixer", "--shape", "2,64,2,16,16"]) == 2


def test_front_door_tune_and_lookup(cache_dir):
    root, made = cache_dir
    report = mf.tune(mf.zoo.gla, shapes=(2, 64, 2, 16, 16), dtype="float32", kernels=["chunk_fwd"], trials=5)
    (r,) = report.results
    assert not r.cache_hit and r.trials_run == 5 and r.config is not None
    from mixforge.codegen.config import ShapeKey

    # the lookup handed to compiled ops answers with the tuned config for any T in the bucket
    assert mf._config_lookup(mf.zoo.gla, ShapeKey("chunk_fwd", "fp32", 2, 50, 2, 16, 16)) == r.config
    assert mf.tune(mf.zoo.gla, shapes=[(2, 64, 2, 16, 16)], dtype="fp32", kernels=["chunk_fwd"],
                   trials=5).cache_hit


def test_nothing_tunes_at_run_time_unless_asked(cache_dir, monkeypatch):
    from mixforge.codegen.config import ShapeKey
    from mixforge.tuner.lookup import TunedLookup

    root, made = cache_dir
    sk = ShapeKey("chunk_fwd", "fp32", 2, 64, 2, 16, 16)
    monkeypatch.delenv("MIXFORGE_AUTOTUNE", raising=False)
    assert TunedLookup()(mf.zoo.gla, sk) is None and made == []
    monkeypatch.setenv("MIXFORGE_AUTOTUNE", "1")
    monkeypatch.setenv("MIXFORGE_AUTOTUNE_TRIALS", "4")
    look = TunedLookup()
    cfg = look(mf.zoo.gla, sk)
    assert cfg is not None and look.resolve(mf.zoo.gla, sk).source == "autotune"
    assert [k for k, _, _ in made] == ["chunk_fwd"] and len(made[0][2].calls) == 4
    # cached: a new process (a new lookup) finds it without tuning again
    assert TunedLookup()(mf.zoo.gla, ShapeKey("chunk_fwd", "fp32", 2, 50, 2, 16, 16)) == cfg
    assert len(made) == 1


def test_a_tune_cut_short_by_its_timeout_resumes_instead_of_hitting_the_cache(cache_dir, tmp_path, monkeypatch):
    from mixforge.tuner.testing import SyntheticObjective

    root, made = cache_dir
    monkeypatch.setattr(api, "make_objective",
                        lambda *a, **k: made.append(o := SyntheticObjective(sleep=lambda c: 0.3)) or o)
    storage = f"journal:{tmp_path / 'j.log'}"
    first = mf.tune(mf.zoo.gla, (2, 64, 2, 16, 16), "fp32", kernels=["chunk_fwd"], trials=20, timeout=1.0,
                    storage=storage)
    (r,) = first.results
    assert r.stop_reason == "timeout" and 0 < r.trials_run < 20 and r.config is not None
    again = mf.tune(mf.zoo.gla, (2, 64, 2, 16, 16), "fp32", kernels=["chunk_fwd"], trials=r.trials_run + 2,
                    storage=storage)
    (r2,) = again.results
    assert not r2.cache_hit and r2.trials_run == 2 and r2.study_trials == r.trials_run + 2


def test_jobs_and_the_table_and_json_report_compile_and_timing_apart(tmp_path, monkeypatch, capsys):
    from mixforge.tuner import precompile
    from mixforge.tuner.testing import FakeCompiler

    monkeypatch.setenv("MIXFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "make_objective", lambda mixer, kernel, shape, dtype, **kw: SyntheticObjective())
    seen = []
    monkeypatch.setattr(precompile, "make_precompiler",
                        lambda *a, jobs, **kw: seen.append(jobs) or FakeCompiler(sleep=0.01))
    out_json = tmp_path / "tune.json"
    assert main(["tune", "gla", "--shape", "2,64,2,16,16", "--dtype", "fp32", "--trials", "4", "--jobs", "2",
                 "--kernels", "chunk_fwd", "--report-json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert seen == [2] and "compile s" in out and "timing s" in out
    (row,) = json.loads(out_json.read_text())["results"]
    assert row["kernel"] == "chunk_fwd" and row["jobs"] == 2 and row["compile_wall_s"] >= 0.01
    assert row["timing_wall_s"] > 0 and row["trials_run"] == 4 and row["config"]
