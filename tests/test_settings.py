"""settings.py: constants -> flags -> config (precedence, presets, script prefixes), every setting
finite and in range at the command line, and messages that name flags the script accepts."""
import ast
import re
from pathlib import Path

import pytest
from conftest import QUICK, assert_user_error, smoke, write_images

import bench
import constants
import convert
import dataset
import evaluate
import explore
import generate_images
import settings
import train

REPO = Path(__file__).resolve().parents[1]


SCRIPTS = {"train": (train.main, ""), "generate_images": (generate_images.main, "GEN_"),
           "evaluate": (evaluate.main, "EVALUATE_"), "bench": (bench.main, ""), "explore": (explore.main, "EXPLORE_")}


def float_settings(prefix):
    return [n for n in settings.setting_names(prefix) if isinstance(getattr(constants, n), float)]


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - {"explore"}))  # explore.py has no float setting
def test_every_float_setting_refuses_nan_and_infinity(script, capsys):
    main, prefix = SCRIPTS[script]
    names = float_settings(prefix)
    assert names
    for name in names:
        for bad in ("nan", "inf", "-inf"):
            line = assert_user_error(capsys, main([f"{settings.flag_of(name)}={bad}"]), settings.flag_of(name))
            assert "finite" in line, line
    tuples = [n for n in settings.setting_names(prefix) if isinstance(getattr(constants, n), tuple)]
    for name in tuples:
        assert_user_error(capsys, main([settings.flag_of(name), "0.1,nan"]), settings.flag_of(name))


@pytest.mark.parametrize("main,argv,flag", [
    (train.main, ["--seed", str(2**64)], "--seed"),
    (train.main, ["--max-steps", "99999999999999999999"], "--max-steps"),
    (bench.main, ["--seed", str(2**63)], "--seed"),
    (evaluate.main, ["--seed", str(2**63)], "--seed"),
    (generate_images.main, ["--truncation", "1e308"], "--truncation"),
    (evaluate.main, ["--truncation", "1e308"], "--truncation"),
])
def test_integers_and_truncation_beyond_what_their_use_holds(capsys, main, argv, flag):
    assert_user_error(capsys, main(argv), flag)


@pytest.mark.parametrize("argv,flag", [
    (["--seeds", "99999999999999999999"], "--seeds"),
    (["--seeds", "1,-2"], "--seeds"),
    (["--mix-seeds", str(2**63), "--mode", "mixing"], "--mix-seeds"),
    (["--psis", "1,nan", "--mode", "truncation"], "--psis"),
    (["--psis", "1e308", "--mode", "truncation"], "--psis"),
])
def test_generate_number_lists_are_finite_and_in_range(capsys, uncond_run, tmp_path, argv, flag):
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--out-dir", str(tmp_path), *argv])
    assert_user_error(capsys, code, flag)
    assert list(tmp_path.iterdir()) == []


def test_ema_kimg_nan_never_trains(data, tmp_path, capsys):
    assert_user_error(capsys, train.main(smoke(data, tmp_path, "--ema-kimg", "nan")), "--ema-kimg", "finite")
    assert not (tmp_path / "Models").exists()


def test_data_splits_must_name_an_existing_split(data, tmp_path, capsys):
    assert_user_error(capsys, train.main(smoke(data, tmp_path, "--data-splits", "")), "--data-splits")
    assert_user_error(capsys, train.main(smoke(data, tmp_path, "--data-splits", " , ")), "--data-splits")
    code = train.main(smoke(data, tmp_path, "--data-splits", "tset", *QUICK))
    assert_user_error(capsys, code, str(data / "tset"), "--data-splits")
    with pytest.raises(settings.UserError, match="--data-splits"):
        dataset.find_images(data, [])


def test_out_dir_on_a_file_is_refused_before_any_work(data, tmp_path, uncond_run, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = train.main(smoke(data, afile, "--max-steps", "1"))
    assert_user_error(capsys, code, "--out-dir", str(afile))
    code = train.main(smoke(data, afile / "sub", "--max-steps", "1"))
    assert_user_error(capsys, code, "--out-dir", "is a file")
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--out-dir", str(afile)])
    assert_user_error(capsys, code, "--out-dir", str(afile))
    code = evaluate.main(["--checkpoint", str(uncond_run / "Models"), "--out", str(afile / "x.json")])
    assert_user_error(capsys, code, "--out", "is a file")  # before the evaluation, not after it
    code = evaluate.main(["--checkpoint", str(uncond_run / "Models"), "--out", str(tmp_path)])
    assert_user_error(capsys, code, "--out", "is a folder")
    assert afile.read_text() == "x"


TOKENS = re.compile(r"\b(train|generate_images|evaluate|bench|explore)\.py\b|\b(torchrun)\b"
                    r"|(?<![\w-])(--[a-z][a-z0-9-]*)")


def accepted_flags(script):
    prefix = SCRIPTS[script][1]
    extra = {"train": train.EXTRA_FLAGS, "bench": bench.EXTRA_FLAGS}.get(script, ())
    return set(settings.build_parser(prefix, "", extra)._option_string_actions)


def suggested_flags(text, script):
    """[(script, flag)] of a message: a flag belongs to the script named before it in its clause
    (`python train.py --preset demo`, `train.py's --data-splits`), else to the script that spoke;
    torchrun's flags are left out."""
    found = []
    for clause in re.split(r"[();]", text):
        owner = script
        for m in TOKENS.finditer(clause):
            if m[3] is None:
                owner = m[1] or m[2]
            elif owner != "torchrun":
                found.append((owner, m[3]))
    return found


def test_the_suggestion_parser_reads_clauses():
    text = "data folder not found: x (set --data-root, or try: python train.py --preset demo); train with --n"
    assert suggested_flags(text, "evaluate") == [("evaluate", "--data-root"), ("train", "--preset"),
                                                 ("evaluate", "--n")]
    assert suggested_flags("(lower torchrun's --nproc_per_node)", "train") == []


def test_every_flag_a_script_mentions_is_one_it_accepts():
    """Each script's own messages (every string in its source), by the rule of suggested_flags."""
    for script in SCRIPTS:
        for message in messages_in(REPO / f"{script}.py"):
            for owner, flag in suggested_flags(message, script):
                assert flag in accepted_flags(owner), (script, message)


def messages_in(path):
    """The text of each UserError, print and warning call in a source file, with `flag_of('NAME')`
    rendered as the flag and other interpolations as {}."""
    def text(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(text(v) for v in node.values)
        if isinstance(node, ast.FormattedValue):
            call = node.value
            if (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "flag_of"
                    and isinstance(call.args[0], ast.Constant)):
                return settings.flag_of(call.args[0].value)
            return "{}"
        if isinstance(node, ast.BinOp):
            return text(node.left) + text(node.right)
        return ""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("UserError", "print", "warn"):
            yield " ".join(text(a) for a in node.args)


def test_errors_from_shared_code_suggest_flags_of_the_script_that_raised_them(tmp_path, uncond_run, capsys):
    """The data and checkpoint errors every script can meet, raised through each script."""
    bad = tmp_path / "bad"
    write_images(bad / "AD", 3)
    write_images(bad / "NC", 3)
    (bad / "NC" / "broken.png").write_bytes(b"not a png")
    missing = tmp_path / "missing"
    checkpoint = str(uncond_run / "Models")
    runs = {
        "train": [["--preset", "smoke", "--data-root", str(root), "--out-dir", str(tmp_path / f"o{i}")]
                  for i, root in enumerate((bad, missing))] + [["--resume", "--out-dir", str(missing)]],
        "evaluate": [["--checkpoint", checkpoint, "--data-root", str(root), "--out", str(tmp_path / "e.json")]
                     for root in (bad, missing)] + [["--checkpoint", str(missing)]],
        "generate_images": [["--checkpoint", checkpoint, "--mode", "tsne", "--data-root", str(root),
                             "--out-dir", str(tmp_path / "g")] for root in (bad, missing)],
    }
    mentioned = set()
    for script, argvs in runs.items():
        for argv in argvs:
            line = assert_user_error(capsys, SCRIPTS[script][0](argv))
            for owner, flag in suggested_flags(line, script):
                assert flag in accepted_flags(owner), (script, line)
                mentioned.add(flag)
    assert {"--skip-bad-images", "--data-root", "--preset", "--out-dir"} <= mentioned


def test_skip_bad_images_works_where_it_is_suggested(tmp_path, uncond_run, capsys):
    bad = tmp_path / "bad"
    write_images(bad, 10)
    (bad / "broken.png").write_bytes(b"not a png")
    code = evaluate.main(["--checkpoint", str(uncond_run / "Models"), "--data-root", str(bad), "--n", "8",
                          "--out", str(tmp_path / "e.json"), "--skip-bad-images"])
    assert code == 0, capsys.readouterr().err
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--mode", "tsne", "--data-root",
                                 str(bad), "--skip-bad-images", "--tsne-n", "10", "--tsne-real", "2",
                                 "--project-steps", "2", "--out-dir", str(tmp_path / "g")])
    assert code == 0, capsys.readouterr().err


def test_unknown_flag(capsys):
    assert_user_error(capsys, train.main(["--bogus-flag", "3"]), "--bogus-flag")


@pytest.mark.parametrize("argv,flag", [
    (["--batch-size", "x"], "--batch-size"),
    (["--g-lr", "fast"], "--g-lr"),
    (["--adam-betas", "a,b"], "--adam-betas"),
    (["--lr-schedule", "sawtooth"], "--lr-schedule"),
    (["--image-mode", "CMYK"], "--image-mode"),
])
def test_wrong_type_or_choice(capsys, argv, flag):
    assert_user_error(capsys, train.main(argv), flag)


@pytest.mark.parametrize("argv,flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--resolution", "48"], "--resolution"),
    (["--resolution", "2048"], "--resolution"),
    (["--resolution", "16"], "--resolution"),
    (["--style-mixing-prob", "1.5"], "--style-mixing-prob"),
    (["--adam-betas", "0.5"], "--adam-betas"),
    (["--adam-betas", "0.5,1.5"], "--adam-betas"),
    (["--adam-betas", "0.0,0.9,0.99"], "--adam-betas"),
    (["--epochs", "0"], "--epochs"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--lr-cycle-min", "2"], "--lr-cycle-min"),
    (["--preset", "smoke", "--sample-count", "1000"], "--sample-count"),
    (["--mode-seeking-full", "-0.5"], "--mode-seeking-full"),
    (["--mode-seeking-full", "-2"], "--mode-seeking-full"),
])
def test_out_of_range(capsys, argv, flag):
    assert_user_error(capsys, train.main(argv), flag)


def constants_assigned():
    """{NAME: value source} of each top-level `NAME = value` line of constants.py, read as text."""
    text = (REPO / "constants.py").read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*) = (.*)$", text, re.M))


@pytest.mark.parametrize("main,prefix", [(train.main, ""), (generate_images.main, "GEN_"),
                                         (evaluate.main, "EVALUATE_")])
def test_help_lists_every_setting_of_constants_py(capsys, main, prefix):
    """Each `NAME = value` line of constants.py is a flag of its script (GEN_* of generate_images.py,
    EVALUATE_* of evaluate.py, CONVERT_* of convert.py, the rest of train.py), except the tables
    (`{...}` values)."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    flags = set(re.findall(r"(--[a-z0-9-]+)", capsys.readouterr().out))
    others = ("GEN_", "EVALUATE_", "CONVERT_", "EXPLORE_")
    expected = {"--" + name.removeprefix(prefix).lower().replace("_", "-")
                for name, value in constants_assigned().items()
                if not value.startswith(("{", "dict(")) and (name.startswith(prefix) if prefix
                                                            else not name.startswith(others))}
    assert len(expected) > 20 if not prefix else len(expected) > 5
    assert expected <= flags, sorted(expected - flags)


def test_resolve_settings_precedence():
    default = settings.resolve_settings({}, "")
    assert default.resolution == constants.RESOLUTION == 256
    preset = settings.resolve_settings({}, "", "smoke")
    assert preset.resolution == 32
    assert preset.batch_size == constants.PRESETS["smoke"]["BATCH_SIZE"]
    assert preset.g_lr == constants.G_LR  # not in the preset: the default
    flags = settings.resolve_settings({"RESOLUTION": 64}, "", "smoke")
    assert flags.resolution == 64
    assert flags.z_dim == constants.PRESETS["smoke"]["Z_DIM"]


def test_resolve_settings_base_below_flags():
    cfg = settings.resolve_settings({"BATCH_SIZE": 8}, "", base={"batch_size": 4, "epochs": 9, "unknown_key": 1})
    assert cfg.batch_size == 8 and cfg.epochs == 9
    assert not hasattr(cfg, "unknown_key")


def test_resolve_settings_checks_the_preset_result():
    with pytest.raises(settings.UserError, match="--resolution"):
        settings.resolve_settings({"RESOLUTION": 100}, "", "smoke")


def test_parse_settings_from_argv():
    given, opts = settings.parse_settings(["--preset", "smoke", "--resolution", "64", "--no-hflip", "--conditional",
                                        "--adam-betas", "0.5,0.9"], "", "doc", train.EXTRA_FLAGS)
    assert given == {"RESOLUTION": 64, "HFLIP": False, "CONDITIONAL": True, "ADAM_BETAS": (0.5, 0.9)}
    assert opts.preset == "smoke" and not getattr(opts, "resume", False)
    cfg = settings.resolve_settings(given, "", opts.preset)
    assert (cfg.resolution, cfg.hflip, cfg.conditional, cfg.adam_betas) == (64, False, True, (0.5, 0.9))
    assert cfg.channel_max == constants.PRESETS["smoke"]["CHANNEL_MAX"]


def test_train_settings_preset_and_flags(tmp_path):
    given, opts = settings.parse_settings(["--preset", "smoke", "--resolution", "64"], "", "", train.EXTRA_FLAGS)
    cfg, state, _ = train.settings(given, opts, tmp_path)
    assert state is None
    assert cfg.resolution == 64 and cfg.preset == "smoke"
    assert cfg.batch_size == constants.PRESETS["smoke"]["BATCH_SIZE"]


def test_generate_settings_strip_prefix():
    given, _ = settings.parse_settings(["--truncation", "0.5", "--seeds", "1,2"], "GEN_", "doc")
    assert given == {"GEN_TRUNCATION": 0.5, "GEN_SEEDS": "1,2"}
    cfg = settings.resolve_settings(given, "GEN_")
    assert cfg.truncation == 0.5 and cfg.seeds == "1,2" and cfg.checkpoint == constants.GEN_CHECKPOINT
    assert not any(k.startswith("gen_") for k in vars(cfg))


def test_every_script_reports_errors_through_one_wrapper(capsys):
    """settings.command: a UserError is one `error:` line and status 2, a failed write one line and 1,
    anything else is not swallowed."""
    def failing(exc):
        @settings.command
        def main(argv=None):
            raise exc
        return main
    assert_user_error(capsys, failing(settings.UserError("--x is bad"))(), "--x is bad")
    assert failing(OSError(28, "No space left on device", "out.png"))() == 1
    assert capsys.readouterr().err == "error: cannot write out.png: No space left on device\n"
    with pytest.raises(ZeroDivisionError):
        failing(ZeroDivisionError())()
    for script in (train, generate_images, evaluate, bench, convert):
        assert script.main.__wrapped__  # each script's main is wrapped by settings.command


@pytest.mark.parametrize("flags,needle", [(["--data-splits", "train,train"], "--data-splits names train twice"),
                                          (["--data-root", " "], "--data-root is empty"),
                                          (["--kimg", "1e-9"], "--kimg 1e-09 is less than one batch (8 images)"),
                                          (["--resume", "--overwrite"], "--resume continues the run")])
def test_contradictory_or_empty_settings_are_one_line(data, tmp_path, capsys, flags, needle):
    argv = smoke(data, tmp_path, *QUICK) + flags  # a later --data-root replaces the shared one
    assert_user_error(capsys, train.main(argv), needle)
    assert not (tmp_path / "Models").exists()
