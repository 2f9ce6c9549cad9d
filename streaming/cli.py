"""`rentalml stream run | produce | broker | topics`."""

from __future__ import annotations

import json
import logging
import sys

import typer


def register(app: typer.Typer) -> None:
    stream = typer.Typer(help="Kafka stream processing: real-time features into Feast", no_args_is_help=True)
    app.add_typer(stream, name="stream")

    @stream.command("run")
    def run(
        metrics_port: int | None = typer.Option(None, help="serve Prometheus /metrics on this port"),
        idle_exit_s: float | None = typer.Option(None, help="exit 0 after this many seconds without records "
                                                 "(tests, backfills); default: run until SIGTERM"),
        max_events: int | None = typer.Option(None, help="exit after handling this many records"),
        seed_dataset: str | None = typer.Option(None, help="seed property attributes the stream has not seen "
                                                "from this dataset spec (see `rentalml benchmark`)"),
        verbose: bool = typer.Option(True, help="one JSON log line per committed batch on stderr"),
    ) -> None:
        """Consume property_data + user_interactions, push real-time features to Feast, emit processed_data
        and dead_letter; commits offsets only after the push. SIGTERM: finish the batch, commit, exit 0."""
        from rentalml.config import get_settings

        from . import metrics
        from .processor import Processor

        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(message)s")
        settings = get_settings()
        if metrics_port:
            metrics.serve(metrics_port)
        proc = Processor(settings)
        if seed_dataset:
            from rentalml.data.loaders import load_dataset
            from rentalml.state import seed_from_dataset

            n = seed_from_dataset(proc.state, load_dataset(seed_dataset))
            typer.echo(json.dumps({"seeded_properties": n}), err=True)
        totals = proc.run(idle_exit_s=idle_exit_s, max_events=max_events)
        typer.echo(json.dumps(totals))

    @stream.command("produce")
    def produce(
        dataset: str = typer.Option("synthetic", help="dataset spec: 'synthetic[:users,props,events]', a dataset "
                                    "dir, 'movielens', 'airbnb' (timestamps shifted to end now)"),
        rate: float = typer.Option(1000.0, help="events per second (0 = as fast as possible)"),
        limit: int | None = typer.Option(None, help="stop after this many interaction events"),
        malformed_fraction: float = typer.Option(0.0, help="mix in this fraction of malformed records"),
        listings: bool = typer.Option(True, help="send a `listed` property_data event per property first"),
        timestamps: str = typer.Option("now", help="now: stamp events when sent (live-like); shifted: the "
                                       "dataset's own times shifted to end now"),
        cycle: bool = typer.Option(False, help="with --timestamps now: replay the interactions again and again "
                                   "(new event ids) until --limit"),
        seed: int = 0,
    ) -> None:
        """Replay a dataset's listings and interactions as contract events at a chosen rate."""
        import itertools

        from rentalml.config import get_settings
        from rentalml.kafka import USER_INTERACTIONS

        from .produce import dataset_events, send_events

        if not 0.0 <= malformed_fraction < 1.0:
            raise typer.BadParameter("must be in [0, 1)", param_hint="--malformed-fraction")
        if timestamps not in ("now", "shifted"):
            raise typer.BadParameter("must be 'now' or 'shifted'", param_hint="--timestamps")
        events = dataset_events(dataset, listings=listings, timestamps=timestamps, cycle=cycle)
        if limit is not None:
            n_inter = itertools.count()
            events = itertools.takewhile(lambda te: te[0] != USER_INTERACTIONS or next(n_inter) < limit, events)
        typer.echo(json.dumps(send_events(events, get_settings(), rate=rate, malformed_fraction=malformed_fraction,
                                          seed=seed)))

    @stream.command("topics")
    def topics() -> None:
        """Create the contract topics (settings.kafka.partitions partitions) where missing."""
        from rentalml.config import get_settings
        from rentalml.kafka import TopicsUnavailable, ensure_topics

        try:
            typer.echo(json.dumps({"created": ensure_topics(get_settings())}))
        except TopicsUnavailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    @stream.command("demo")
    def demo(dataset: str = typer.Option("synthetic:500,200,5000", help="dataset spec or directory"),
             events: int = typer.Option(5000, help="interactions to stream"),
             rate: float = typer.Option(0.0, help="events/s (0 = as fast as possible)")) -> None:
        """The streaming loop on loopback for `make demo`: a Tansu broker, the dataset's listings and
        interactions produced (1 % malformed), the processor until idle, then the online features it pushed."""
        import itertools

        from rentalml.config import get_settings
        from rentalml.kafka import USER_INTERACTIONS
        from rentalml.services import start_tansu
        from rentalml.state import recent_history

        from .processor import Processor
        from .produce import dataset_events, send_events

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        broker = start_tansu()
        try:
            base = get_settings()
            settings = base.model_copy(update={"kafka": base.kafka.model_copy(
                update={"bootstrap_servers": broker.url})})
            n_inter = itertools.count()
            evs = itertools.takewhile(lambda te: te[0] != USER_INTERACTIONS or next(n_inter) < events,
                                      dataset_events(dataset))
            sent = send_events(evs, settings, rate=rate, malformed_fraction=0.01)
            typer.echo(json.dumps({"broker": broker.url, "produced": sent}))
            proc = Processor(settings, log_fn=lambda doc: None)
            totals = proc.run(idle_exit_s=3.0)
            typer.echo(json.dumps({"processed": totals}))
            from rentalml.features.store import online_features, open_store

            store = open_store(settings)
            feats = online_features(store, property_ids=["p_000001", "p_000002", "p_000003"],
                                    features=["property_attributes:price", "property_attributes:city",
                                              "property_engagement:views_24h", "property_engagement:saves_7d"])
            typer.echo(feats.to_string(index=False))
            typer.echo(f"recent_history(u_000001) = {recent_history('u_000001', settings)}")
        finally:
            broker.stop()

    @stream.command("broker")
    def broker(port: int = typer.Option(9092, help="loopback port"),
               storage: str = typer.Option("memory://tansu/", help="Tansu storage engine URL")) -> None:
        """Run a Tansu broker (Kafka API) on 127.0.0.1 in the foreground for development (Ctrl-C stops it)."""
        import signal
        import threading

        from rentalml.config import Settings
        from rentalml.kafka import ensure_topics
        from rentalml.services import start_tansu

        svc = start_tansu(port=port, storage=storage)
        settings = Settings(kafka={"bootstrap_servers": svc.url})
        created = ensure_topics(settings)
        typer.echo(json.dumps({"bootstrap_servers": svc.url, "created": created}))
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                if svc.proc.poll() is not None:
                    raise typer.Exit(svc.proc.returncode or 1)
        except KeyboardInterrupt:
            pass
        finally:
            svc.stop()
