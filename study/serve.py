"""Serve a study's storage over Optuna's gRPC storage proxy, for many workers on many machines.

Every worker of a database-backed study holds its own database connections; at a few dozen workers
the database's connection limit and lock traffic become the bottleneck. Optuna's answer is its gRPC
storage proxy: one process holds the database connections and workers talk to it. Start it next to
the database, then point every worker (and the report) at it:

    python -m study.serve --storage postgresql://postgres@db-host/test --host 0.0.0.0 --port 13000
    python -m study.depth --preset full --storage grpc://proxy-host:13000 --out runs/mnist   # each worker

The claim protocol holds through the proxy (study/coord.py): liveness is a counter every observer
judges on its own clock, and a claim's "still running?" check stays atomic in the database. Several
proxies may serve one PostgreSQL database; a SQLite file should have one proxy and no direct writers.
The proxy speaks unauthenticated, unencrypted gRPC: keep it on a private network.
"""

from __future__ import annotations

from mnist_bench import cli

cli.starting(__name__)

import warnings

import optuna

from mnist_bench.errors import UsageError
from mnist_bench.redact import redact

from .config import in_memory
from .storage import (
    PROXY_SAYS,
    StudyError,
    explain,
    first_line,
    grpc_address,
    lost_connection,
    open_storage,
    quiet_grpc,
)

DEFAULT_PORT = 13000


def parse_args(argv: list[str] | None = None):
    p = cli.Parser("python -m study.serve", __doc__)
    p.add_argument("--storage", required=True, help="the database to serve: sqlite:///FILE or postgresql://...")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0: all)")
    p.add_argument(
        "--port",
        type=cli.bounded_int(1, 65535, "a TCP port"),
        default=DEFAULT_PORT,
        help=f"TCP port to listen on (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "--threads",
        type=cli.bounded_int(1, 1024, "server threads"),
        default=32,
        help="threads answering workers' calls (default: 32)",
    )
    return p.parse_args(argv)


def server(url: str, host: str, port: int, threads: int):
    """A started gRPC server for the storage at `url` (the caller waits on it or stops it)."""
    from concurrent.futures import ThreadPoolExecutor

    if grpc_address(url) is not None:
        raise UsageError("--storage must be a database URL; a proxy does not serve another proxy")
    if in_memory(url):
        raise UsageError(f"--storage {url} is an in-memory database: it would keep nothing; give a file or a server")
    quiet_grpc()
    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    # What run_grpc_proxy_server builds, plus a server that does not block and a port that is not shared:
    # gRPC sets SO_REUSEPORT by default, so a second proxy on a taken port would start without a word.
    # The port is bound first, so a refused start creates no database.
    srv = grpc.server(
        ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0)], interceptors=[explaining(url)]
    )
    try:
        bound = srv.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio: "Failed to bind to address ..."
        bound = 0
    if bound == 0:
        raise StudyError(f"cannot listen on {host}:{port}: the port is taken, or the address is not this machine's")
    storage = optuna.storages.get_storage(open_storage(url))  # Optuna's in-process cache, as its docs advise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), srv)
    srv.start()
    return srv


def explaining(url: str):
    """A gRPC server interceptor: a storage call that fails in the proxy's database answers the worker with
    the database's own words, classified (study.storage.explain), instead of gRPC's "Exception calling
    application" with Optuna's wrapper message (and a traceback in the proxy's log): the worker then says
    what the database refused, not that it lost the connection."""
    import grpc
    import sqlalchemy.exc

    class Explaining(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            handler = continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler
            inner = handler.unary_unary

            def behaviour(request, context):
                try:
                    return inner(request, context)
                except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
                    lost = lost_connection(e)
                    said = None if lost else explain(e, url)
                    code = grpc.StatusCode.UNAVAILABLE if lost else grpc.StatusCode.INTERNAL
                    context.abort(code, f"{PROXY_SAYS}{said or first_line(e)}")

            return grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

    return Explaining()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    srv = server(args.storage, args.host, args.port, args.threads)
    print(f"serving {redact(args.storage)} on grpc://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        srv.wait_for_termination()
    finally:
        srv.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    cli.run(main)
