"""The AsyncAPI document of every subject and its schema, generated from the services themselves: each
service's app is built (nothing connects) and their brokers are described together, beside a broker
standing for the clients outside the five services (workloads, people, other languages' tools).

    faststream docs gen shared.asyncapi:build_app --factory -o docs/asyncapi.json
"""
import importlib

from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from shared import subjects
from shared.broker import stream
from shared.schemas import BY_SUBJECT
from shared.settings import Settings

SERVICES = ("observer", "detector", "generator", "benchmarker", "deployer")
SERVER = "nats://localhost:4222"  # what `docker compose up` and `kernelloop up` listen on

# What each subject carries, and who else publishes it, for someone writing a client.
ABOUT = {
    subjects.KERNEL_STATS: "One window of aggregated calls per (op, dtype, shape bucket) on one hardware.",
    subjects.USAGE_CHANGED: "A usage change of one kernel key; publish one by hand to start a campaign.",
    subjects.HYPOTHESIS: "A campaign: the workload profile, the incumbent, the budget.",
    subjects.VARIANT_READY: "A Triton variant to benchmark; its id is the hash of its source and params.",
    subjects.BENCH_RESULT: "Correctness and timings of one variant against the incumbent.",
    subjects.REFINE: "The next round a campaign needs: what failed, the best so far, the budget left.",
    subjects.DEPLOY: "A variant now serves a key as a canary, was promoted or withdrawn after it, or a rollback "
                     "restored one; the registry revision it wrote.",
    subjects.PROFILER_TRACE: "A PyTorch profiler trace (Chrome trace JSON) to turn into kernel.stats.",
    subjects.DEPLOY_PENDING: "A winner the deploy policy holds for a person; answer on deploy.approval.",
    subjects.DEPLOY_APPROVAL: "Approve or reject a pending deploy; any client may publish it.",
    subjects.CANARY_REPORT: "A workload's A/B of a canary deploy: per step kind and window, each arm's median "
                            "step time; the deployer promotes or withdraws the canary on them.",
}
# Subjects published from outside the five services.
CLIENTS = {
    subjects.KERNEL_STATS: "Workload",  # the observer SDK inside the inference process
    subjects.CANARY_REPORT: "Workload",
    subjects.PROFILER_TRACE: "People",  # `kernelloop observe trace`; the workload user may send kernel.stats only
    subjects.USAGE_CHANGED: "People",  # e.g. a planned model roll-out
    subjects.DEPLOY_APPROVAL: "People",
}


def _describe(broker: NatsBroker) -> None:
    """Publishers declared without a schema send the subject's shared model: say so in the document."""
    for publisher in broker.publishers:
        config = publisher.specification.config
        subject = config.subject
        if config.schema_ is None and subject in BY_SUBJECT:
            config.schema_ = BY_SUBJECT[subject]
        if config.description_ is None and subject in ABOUT:
            config.description_ = ABOUT[subject]


def build_app() -> FastStream:
    # Defaults, not the environment: the document must not change with whoever generates it.
    settings = Settings.model_construct(nats_url=SERVER)
    brokers = [importlib.import_module(f"{name}.app").build_app(settings).broker for name in SERVICES]
    clients = NatsBroker(SERVER)
    for subject, who in CLIENTS.items():
        clients.publisher(subject, stream=stream(), schema=BY_SUBJECT[subject], title=f"{subject}:{who}",
                          description=ABOUT[subject])
    for broker in brokers:
        _describe(broker)
    declared = {p.specification.config.subject for b in brokers + [clients] for p in b.publishers}
    missing = {s for s in subjects.ALL if not s.endswith(">")} - declared
    if missing:
        raise RuntimeError(f"no publisher declared for {sorted(missing)}: the document would not describe them")
    spec = AsyncAPI(*brokers, clients, title="kernelloop", version="0.1.0",
                    description="Every subject of the loop and the JSON schema of its events. All events go "
                                f"through the JetStream stream {subjects.STREAM_NAME}; set the Nats-Msg-Id header "
                                "to the event's event_id so a retried publish is de-duplicated.")
    return FastStream(brokers[0], specification=spec)
