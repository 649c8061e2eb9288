from spp_jax import cli


def test_demo_runs_and_padded_batch_matches():
    out = cli.demo(levels=(2, 1), channels=3, batch=1)
    assert out["dim"] == 15 and out["padded_max_abs_diff"] == 0.0


def test_main_exit_code():
    assert cli.main(["demo", "--levels", "2,1", "--channels", "4"]) == 0
