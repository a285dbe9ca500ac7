"""`fewstep evaluate` and `fewstep bench`: registered on the main typer app by fewstep.cli."""


from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fewstep.checks import at_least, output_file, output_folder
from fewstep.cli_data import data_options
from fewstep.threads import THREADS_HELP, apply_threads


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, float) for a in v):
        return f"[{v[0]:.4g}, {v[1]:.4g}]"
    return str(v)


def register(app: typer.Typer, friendly, out_console, parse_timesteps, help_texts: dict[str, str]) -> None:
    @app.command()
    @friendly
    @data_options
    def evaluate(
        model: Annotated[Path, typer.Option(help="A model folder (fewstep or diffusers).")],
        sampler: Annotated[str | None, typer.Option(help="ddpm, ddim, euler, heun, dpmpp-2m or "
                                                       "consistency (default: the model's recorded sampler).")] = None,
        data: Annotated[str | None, typer.Option(help="Reference data, measured against its test split: a data "
                                                    "set's name or your own source (default: the data the model "
                                                    "records; required for diffusers folders).")] = None,
        steps: Annotated[int | None, typer.Option(help=help_texts["steps"])] = None,
        spacing: Annotated[str | None, typer.Option(help=help_texts["spacing"])] = None,
        timesteps: Annotated[str | None, typer.Option(help=help_texts["timesteps"])] = None,
        guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale (1: none).")] = None,
        eta: Annotated[float, typer.Option(help="DDIM eta.")] = 0.0,
        n: Annotated[int | None, typer.Option(help="Samples (default: the size of the test split, e.g. 500 "
                                                 "for digits, 1000 for mnist; at least 200 on images; FD is "
                                                 "compared at equal n).")] = None,
        seed: Annotated[int, typer.Option(help="Noise seed (same seed, same numbers).")] = 0,
        json_out: Annotated[Path | None, typer.Option("--json", help="Write every metric as JSON here.")] = None,
        batch_size: Annotated[int, typer.Option(help="Samples per network call.")] = 500,
        inception: Annotated[bool, typer.Option("--inception", help="Also InceptionV3 FD (needs `make inception`; "
                                                "slow on CPU, biased at small n).")] = False,
        threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    ) -> None:
        """Sample a model and measure FD, KID, precision/recall, class accuracy and cost against the test split."""
        if json_out is not None:
            output_file(json_out, "--json")  # before the evaluation, so its results are never lost
        for flag, v in (("--n", n), ("--steps", steps), ("--batch-size", batch_size)):
            at_least(flag, v, 1)
        at_least("--seed", seed, 0)
        at_least("--eta", eta, 0)
        apply_threads(threads)
        from fewstep.evaluate.runner import check_n, default_n, evaluate_samples, model_dataset
        from fewstep.generate import sample_model
        from fewstep.io import write_json
        from fewstep.models.folder import load_model

        m = load_model(model)
        dataset = model_dataset(m, data)
        if inception:
            from fewstep.evaluate.inception import _network

            _network()  # fail early with the install hint
        n = n or default_n(dataset)
        check_n(dataset, n)  # too few, or more than the splits hold: before sampling
        res = sample_model(m, n, sampler=sampler, steps=steps, spacing=spacing, timesteps=parse_timesteps(timesteps),
                           guidance=guidance, seed=seed, eta=eta, batch_size=batch_size)
        row = evaluate_samples(dataset, str(model), res, seed)
        js = row.to_json()
        if inception:
            from fewstep.evaluate.inception import inception_fd

            js["inception_fd"] = inception_fd(dataset, res.x)
        table = Table(title=f"{model} on {dataset} (n={n})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("floor (train vs test)", justify="right")
        floor = js["floor"]
        for key in ("fd", "fd_ci", "kid", "precision", "recall", "accuracy", "swd", "mmd", "loglik", "inception_fd"):
            if js.get(key) is not None:
                table.add_row(key, _fmt(js[key]), _fmt(floor.get(key)))
        for key in ("nfe", "wall_seconds", "samples_per_s", "peak_rss_mb", "feature_accuracy", "feature_error"):
            if js.get(key) is not None:
                table.add_row(key, _fmt(js[key]), "")
        out_console.print(table)
        if json_out:
            write_json(json_out, js)

    @app.command()
    @friendly
    def bench(
        config: Annotated[Path, typer.Argument(help="Benchmark YAML (see benchmarks/*.yaml).")],
        profile: Annotated[str, typer.Option(help="quick or full: which profile of the config to run.")] = "full",
        out: Annotated[Path | None, typer.Option(help="Output folder (default: the config's `out`).")] = None,
        threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    ) -> None:
        """Run a quality-vs-speed sweep on one teacher: samplers x NFE, diffusers baselines, students.

        Rows are cached one by one in a SQLite database, so an interrupted run resumes; writes CSV, plots,
        sample grids and a self-contained HTML report."""
        apply_threads(threads)
        from fewstep.evaluate.bench import load_bench_config, run_bench

        cfg = load_bench_config(config, profile)
        if out is not None:
            cfg.out = out
        output_folder(Path(cfg.out), "--out" if out is not None else f"{config}: out")
        report = run_bench(cfg, log=lambda s: out_console.print(s, highlight=False))
        out_console.print(f"report: {report}")

