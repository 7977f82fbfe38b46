"""Device runtime: plan each request, run the local prefix while the server part's weights and the cut
tensors stream to the edge server, fall back to local execution, report predicted vs measured.

    from ue_client import CoinferClient
    with CoinferClient("torchvision:resnet18", server="127.0.0.1:50051") as client:
        y = client(x)
        print(client.last_report)
"""

from ue_client.client import CoinferClient, LocalEngine, RemoteEngine, new_tenant
from ue_client.errors import (
    CoinferError,
    DeadlineExceeded,
    InputError,
    ProtocolError,
    RequestFailed,
    ServerError,
    ServerUnavailable,
)
from ue_client.options import ClientOptions, LinkOverride
from ue_client.report import RequestReport

__all__ = ["ClientOptions", "CoinferClient", "CoinferError", "DeadlineExceeded", "InputError", "LinkOverride",
           "LocalEngine", "ProtocolError", "RemoteEngine", "RequestFailed", "RequestReport", "ServerError",
           "ServerUnavailable", "new_tenant"]
