# twistd -ny etc/dpvoip.tac: the same service as `twistd -n dpvoip`, configured from
# $DPVOIP_CONFIG (or built-in defaults) and the environment.
import os

from twisted.application.service import Application
from twisted.logger import ILogObserver

from dpvoip.logs import observer
from dpvoip.service import makeService
from dpvoip.tap import load_or_exit

config = load_or_exit(None, os.environ)
application = Application("dpvoip")
application.setComponent(ILogObserver, observer(config.log.format, config.log.level))
makeService(config).setServiceParent(application)
