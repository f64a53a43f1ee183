"""`python -m observer.demos [up options]`: the demo workload beside a loop it starts, which is what
`kernelloop up --demo` hands over to. The options are the command's own (`kernelloop up --help`)."""
import signal
import sys

from kernelloop.cli import build_parser, console
from shared.interpreter import use_interpreter_without_gpu


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(["up", "--demo", *(sys.argv[1:] if argv is None else argv)])
    use_interpreter_without_gpu()  # before any Triton kernel module is imported
    from observer.demos.demo import run_demo_loop
    from observer.demos.llama_demo import choose_workload, run_llama_demo_loop
    from shared import hardware
    from shared.settings import Settings

    settings = Settings()
    signal.signal(signal.SIGTERM, _interrupt)  # stop the services as Ctrl-C would
    # a NATS_URL given names a loop already up; otherwise the demo starts its own server
    nats_url = None if args.embedded or "nats_url" not in settings.model_fields_set else settings.nats_url
    try:
        if choose_workload(args.workload, hardware.device()) == "llama":
            return run_llama_demo_loop(settings, nats_url, model=args.model, preset=args.preset, dtype=args.dtype,
                                       phase_s=args.phase_s, deadline_s=args.deadline_s)
        return run_demo_loop(settings, nats_url=nats_url, phase_s=45.0 if args.phase_s is None else args.phase_s,
                             shapes=args.shapes, dtype=args.dtype or "float16",
                             deadline_s=480.0 if args.deadline_s is None else args.deadline_s)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:  # --model hf without transformers installed
        return console.fail(str(e), 1)


if __name__ == "__main__":
    sys.exit(main())
