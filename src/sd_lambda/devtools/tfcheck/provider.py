"""``terraform-provider-aws`` stand-in: serves the real aws schema over tfplugin6, plans offline.

Run by Terraform (never by hand) through the launcher :mod:`sd_lambda.devtools.tfcheck.runner` writes. The
go-plugin handshake and mTLS certificate come from PyPI ``tf`` (its generated tfplugin6 protobufs and
``tf.runner``'s self-signed certificate); the servicer itself is ours because ``tf``'s high-level schema
classes cannot express list-nested blocks.

It validates nothing itself (Terraform core checks configuration against the schema), plans creates
as "config + unknown computed attributes", reads data sources with plausible values
(:mod:`sd_lambda.devtools.tfcheck.datasources`) and refuses to apply or import anything.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from tf.gen import grpc_controller_pb2 as controller_pb
from tf.gen import grpc_controller_pb2_grpc as controller_rpc
from tf.gen import grpc_stdio_pb2_grpc as stdio_rpc
from tf.gen import tfplugin_pb2 as pb
from tf.gen import tfplugin_pb2_grpc as rpc
from tf.runner import _self_signed_cert

from sd_lambda.devtools.tfcheck import cty
from sd_lambda.devtools.tfcheck.datasources import DataOverrides, NotFound, World, read_data_source
from sd_lambda.devtools.tfcheck.env import DATA_OVERRIDES_ENV, SCHEMA_ENV
from sd_lambda.devtools.tfcheck.planning import ProviderSettings, conform, plan_change
from sd_lambda.devtools.tfcheck.schema import DEFAULT_SCHEMA_PATH, ProviderSchema, load_schema, to_response

# go-plugin's handshake cookie for Terraform providers: proves Terraform, not a person, started us.
_MAGIC_COOKIE_KEY = "TF_PLUGIN_MAGIC_COOKIE"
_MAGIC_COOKIE_VALUE = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2"

Response = TypeVar("Response")
Handler = Callable[..., Response]


def _error(summary: str, detail: str = "") -> pb.Diagnostic:
    return pb.Diagnostic(severity=pb.Diagnostic.ERROR, summary=summary, detail=detail)


def _guarded(
    response_type: Callable[..., Response],
) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Turn a crash inside a handler into an error diagnostic Terraform prints, instead of an RPC error."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Response:
            try:
                return handler(self, request, context)
            except Exception as exc:
                summary = f"tfcheck provider stub failed in {handler.__name__}: {exc}"
                return response_type(diagnostics=[_error(summary, traceback.format_exc())])

        return wrapper

    return decorate


class StubProvider(rpc.ProviderServicer):
    """The tfplugin6 ``Provider`` service over one loaded :class:`ProviderSchema`."""

    def __init__(self, schema: ProviderSchema, data_overrides: DataOverrides | None = None) -> None:
        self.schema = schema
        self.data_overrides = data_overrides or {}
        self.settings = ProviderSettings()
        self._schema_response: pb.GetProviderSchema.Response | None = None

    def _world(self) -> World:
        return World.from_overrides(self.settings.region, self.data_overrides)

    def GetMetadata(self, request, context):
        return pb.GetMetadata.Response(
            server_capabilities=pb.ServerCapabilities(plan_destroy=True),
            resources=[pb.GetMetadata.ResourceMetadata(type_name=name) for name in self.schema.resources],
            data_sources=[
                pb.GetMetadata.DataSourceMetadata(type_name=name) for name in self.schema.data_sources
            ],
        )

    def GetProviderSchema(self, request, context):
        if self._schema_response is None:
            self._schema_response = to_response(self.schema)
        return self._schema_response

    def ValidateProviderConfig(self, request, context):
        return pb.ValidateProviderConfig.Response()

    def ValidateResourceConfig(self, request, context):
        return pb.ValidateResourceConfig.Response()

    def ValidateDataResourceConfig(self, request, context):
        return pb.ValidateDataResourceConfig.Response()

    @_guarded(pb.ConfigureProvider.Response)
    def ConfigureProvider(self, request, context):
        self.settings = ProviderSettings.from_config(cty.decode(request.config.msgpack), os.environ)
        return pb.ConfigureProvider.Response()

    def StopProvider(self, request, context):
        return pb.StopProvider.Response()

    @_guarded(pb.UpgradeResourceState.Response)
    def UpgradeResourceState(self, request, context):
        if request.raw_state.flatmap:
            raise ValueError("flatmap state (Terraform < 0.12) is not supported")
        state = json.loads(request.raw_state.json) if request.raw_state.json else None
        block = self.schema.resource_block(request.type_name)
        upgraded = conform(block, state) if state is not None else None
        return pb.UpgradeResourceState.Response(upgraded_state=pb.DynamicValue(msgpack=cty.encode(upgraded)))

    def ReadResource(self, request, context):
        # Nothing exists offline to refresh from: the stored state is the truth.
        return pb.ReadResource.Response(new_state=request.current_state, private=request.private)

    @_guarded(pb.PlanResourceChange.Response)
    def PlanResourceChange(self, request, context):
        prior = cty.decode(request.prior_state.msgpack)
        proposed = cty.decode(request.proposed_new_state.msgpack)
        if proposed is None:  # destroy
            planned = None
        else:
            block = self.schema.resource_block(request.type_name)
            config = cty.decode(request.config.msgpack) or {}
            planned = plan_change(block, prior, proposed, config, self.settings)
        return pb.PlanResourceChange.Response(planned_state=pb.DynamicValue(msgpack=cty.encode(planned)))

    def ApplyResourceChange(self, request, context):
        summary = "The tfcheck provider stub cannot apply"
        detail = "It exists to validate and plan offline; no AWS API is reachable from it."
        return pb.ApplyResourceChange.Response(diagnostics=[_error(summary, detail)])

    def ImportResourceState(self, request, context):
        summary = "The tfcheck provider stub cannot import"
        return pb.ImportResourceState.Response(
            diagnostics=[_error(summary, "No AWS API is reachable offline.")]
        )

    @_guarded(pb.ReadDataSource.Response)
    def ReadDataSource(self, request, context):
        config = cty.decode(request.config.msgpack)
        block = self.schema.data_source_block(request.type_name)
        try:
            state = read_data_source(request.type_name, block, config, self._world(), self.data_overrides)
        except NotFound as exc:
            return pb.ReadDataSource.Response(diagnostics=[_error(f"reading {request.type_name}: {exc}")])
        return pb.ReadDataSource.Response(state=pb.DynamicValue(msgpack=cty.encode(state)))

    def GetFunctions(self, request, context):
        return pb.GetFunctions.Response()


class _Controller(controller_rpc.GRPCControllerServicer):
    def __init__(self, shutdown: threading.Event) -> None:
        self._shutdown = shutdown

    def Shutdown(self, request, context):
        self._shutdown.set()
        return controller_pb.Empty()


def serve(provider: StubProvider) -> None:
    """Serve until Terraform shuts the plugin down, speaking go-plugin's handshake on stdout."""
    shutdown = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rpc.add_ProviderServicer_to_server(provider, server)
    controller_rpc.add_GRPCControllerServicer_to_server(_Controller(shutdown), server)
    # go-plugin streams the plugin's stdio over this service; an empty servicer answers "nothing".
    stdio_rpc.add_GRPCStdioServicer_to_server(stdio_rpc.GRPCStdioServicer(), server)
    with tempfile.TemporaryDirectory(prefix="tfcheck-plugin-") as socket_dir:
        socket_path = str(Path(socket_dir) / "plugin.sock")
        certificate_der, credentials = _self_signed_cert()
        server.add_secure_port(f"unix://{socket_path}", credentials)
        server.start()
        certificate = base64.b64encode(certificate_der).decode().rstrip("=")
        # core protocol | app protocol | network | address | protocol | server certificate
        print(f"1|6|unix|{socket_path}|grpc|{certificate}", flush=True)
        shutdown.wait()
        server.stop(grace=1).wait()


def main() -> int:
    if os.environ.get(_MAGIC_COOKIE_KEY) != _MAGIC_COOKIE_VALUE:
        print(
            "This is the tfcheck stand-in for terraform-provider-aws; Terraform starts it. "
            "Use `sd-lambda tfcheck validate|plan DIR` instead.",
            file=sys.stderr,
        )
        return 1
    schema = load_schema(Path(os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA_PATH))
    overrides = json.loads(os.environ.get(DATA_OVERRIDES_ENV) or "{}")
    serve(StubProvider(schema, overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
