"""``python -m pd.multi_api_server``: the same as ``pd-serve multi-api-server``
(``pd/api_servers.py``), for the FastDeploy command lines that start it this way."""

import sys

from pd.api_servers import multi_api_server_main

if __name__ == "__main__":
    sys.exit(multi_api_server_main(sys.argv[1:]))
