"""`tripletflow nightly`: EmbeddingStats for one date partition, or a backfill range.

Input and output paths come from templates holding `{date}` (YYYY-MM-DD), e.g.
`--input-template 'gs://b/in/date={date}/*' --output-template 'gs://b/out/date={date}'`.
Each date is one `tripletflow run` (pipelines.embedding_stats), whose job commits the
date's output with MANIFEST.json last, so a re-run replaces that date's outputs whole and
two runs never mix. A failed attempt
publishes nothing and is retried whole (`--attempts`): Beam's local runners do not
retry a bundle whose worker died, Dataflow does so itself. Any other flag (Beam
options: --runner, --project, ...; EmbeddingStats flags: --grid, --dim, ...) is passed
through to every run. Flags are accepted with dashes or underscores, since Airflow's
Beam operator writes `--input_template=...`. After each published run, the report
(components.report) is written with the earlier date partitions as history, so that
trends and AUC drops raise alerts (the report's flags, shared with `tripletflow run`).
"""

from __future__ import annotations

import argparse
import datetime
import sys

from apache_beam.io.filesystems import FileSystems

from pipelines import report
from pipelines.cli import HelpFormatter
from pipelines.exit_codes import ExitCode
from schemas import contract

PROG = "tripletflow nightly"
DATE_FIELD = "date"  # the template field: {date} -> YYYY-MM-DD
DATE_FORMAT = "%Y-%m-%d"
DEFAULT_ATTEMPTS = 2  # one retry of a failed run (e.g. a worker that died on a local runner)
MAX_BACKFILL_DAYS = 366  # a guard against a typo such as 2042 for 2024

# `tripletflow run` exits FAILED when the pipeline itself failed and nothing was published:
# only that is retried (bad flags/inputs, wrong grids or alerts would fail the same way again).
RETRIED = (ExitCode.FAILED,)


def parse_date(text: str) -> datetime.date:
    try:
        return datetime.datetime.strptime(text, DATE_FORMAT).date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"dates are YYYY-MM-DD, got {text!r}") from None


def yesterday_utc(now: datetime.datetime | None = None) -> datetime.date:
    """The default partition: the UTC day before `now` (default: the current time)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(datetime.timezone.utc).date() - datetime.timedelta(days=1)


def date_range(first: datetime.date, last: datetime.date) -> list[datetime.date]:
    """Every date from `first` to `last`, both included; ValueError when reversed or too long."""
    if last < first:
        raise ValueError(f"--backfill range is reversed: {first} > {last}")
    days = (last - first).days + 1
    if days > MAX_BACKFILL_DAYS:
        raise ValueError(f"--backfill covers {days} days, more than {MAX_BACKFILL_DAYS}; split it")
    return [first + datetime.timedelta(days=offset) for offset in range(days)]


def check_template(template: str, flag: str) -> None:
    """ValueError unless `template` formats with {date} alone (and holds it, for outputs)."""
    try:
        template.format(**{DATE_FIELD: "2000-01-01"})
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{flag} {template!r}: only the field {{{DATE_FIELD}}} is allowed ({error})") from None
    if "{" + DATE_FIELD + "}" not in template:
        raise ValueError(f"{flag} {template!r} must contain {{{DATE_FIELD}}}, or every date would share one path")


def partition_paths(input_template: str, output_template: str, date: datetime.date) -> tuple[str, str]:
    """(input glob, output directory) of one date."""
    value = date.strftime(DATE_FORMAT)
    return input_template.format(**{DATE_FIELD: value}), output_template.format(**{DATE_FIELD: value})


def history_root(output_template: str) -> str:
    """The folder holding every date's partition: the template cut before the segment with {date}."""
    return output_template[: output_template.index("{" + DATE_FIELD + "}")].rsplit("/", 1)[0]


def is_complete(output_dir: str) -> bool:
    """True when `output_dir` holds a published run (its MANIFEST.json, written last)."""
    return FileSystems.exists(FileSystems.join(output_dir.rstrip("/"), contract.MANIFEST_FILE))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Other flags (EmbeddingStats and Beam options, see tripletflow run --help) are passed to every run.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--input-template",
        "--input_template",
        dest="input_template",
        required=True,
        help="input glob with {date}, e.g. 'gs://b/in/date={date}/*.tfrecord.gz'",
    )
    p.add_argument(
        "--output-template",
        "--output_template",
        dest="output_template",
        required=True,
        help="output directory with {date}, e.g. 'gs://b/out/date={date}'",
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument("--date", type=parse_date, help="the partition YYYY-MM-DD (default: yesterday, UTC)")
    when.add_argument(
        "--backfill",
        nargs=2,
        type=parse_date,
        metavar=("FROM", "TO"),
        help="every date from FROM to TO (inclusive); dates already complete are skipped",
    )
    p.add_argument("--force", action="store_true", help="with --backfill: re-run complete dates too")
    p.add_argument(
        "--attempts", type=int, default=DEFAULT_ATTEMPTS, help="tries per date; a failed try publishes nothing"
    )
    report.add_report_arguments(
        p.add_argument_group("report, written after each date (--history default: the templates' partition root)"),
        skippable=True,
    )
    return p


def run_date(date: datetime.date, args, passthrough: list[str], log=print) -> int:
    """Runs EmbeddingStats for one date, retrying a failed run whole; returns its exit code."""
    from pipelines import embedding_stats  # Beam + TensorFlow only once the flags are valid

    input_glob, output_dir = partition_paths(args.input_template, args.output_template, date)
    argv = ["--input", input_glob, "--output", output_dir, "--no-report", *passthrough]
    code = ExitCode.FAILED
    for attempt in range(1, args.attempts + 1):
        log(f"{PROG}: {date} attempt {attempt}/{args.attempts}: {input_glob} -> {output_dir}")
        try:
            code = embedding_stats.run(argv)
        except Exception as error:  # a run that raised instead of returning: same as a failed run
            log(f"{PROG}: {date}: {type(error).__name__}: {error}")
            code = ExitCode.FAILED
        if code not in RETRIED:
            break
    if code != ExitCode.OK or not args.report or any(arg.startswith("--dry_run") for arg in passthrough):
        return code
    return report_date(output_dir, args)


def report_date(output_dir: str, args) -> int:
    """Writes the date's report with the earlier partitions as history; the alert code when asked."""
    return report.write_report(
        output_dir,
        history_root=args.history or history_root(args.output_template),
        thresholds=args.threshold,
        fail_on_alert=args.fail_on_alert,
        prog=PROG,
    )


def run(argv=None) -> int:
    args, passthrough = parser().parse_known_args(list(argv or []))
    try:
        check_template(args.input_template, "--input-template")
        check_template(args.output_template, "--output-template")
        if args.attempts < 1:
            raise ValueError(f"--attempts must be >= 1, got {args.attempts}")
        report.check_thresholds(args.threshold)
        if args.backfill:
            dates, skip_complete = date_range(*args.backfill), not args.force
        else:
            dates, skip_complete = [args.date or yesterday_utc()], False
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    failed = []
    for date in dates:
        output_dir = partition_paths(args.input_template, args.output_template, date)[1]
        if skip_complete and is_complete(output_dir):
            print(f"{PROG}: {date}: already complete ({output_dir}/{contract.MANIFEST_FILE}); skipped")
            continue
        code = run_date(date, args, passthrough)
        if code != ExitCode.OK:
            failed.append((date, code))
    if failed:
        listed = ", ".join(f"{date} (exit {code})" for date, code in failed)
        print(f"{PROG}: error: {len(failed)} of {len(dates)} date(s) failed: {listed}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK


if __name__ == "__main__":  # `python -m pipelines.nightly ...`, as Airflow's Beam operator runs it
    sys.exit(run(sys.argv[1:]))
