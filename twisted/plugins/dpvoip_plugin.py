"""Makes ``twistd dpvoip`` available; dpvoip itself is imported only when it is used."""

from twisted.application.service import ServiceMaker

dpvoip = ServiceMaker(
    "dpvoip",
    "dpvoip.tap",
    "Telephony daemon for the D.P. Economy CRM (Fritz!Box, Zadarma, tickets)",
    "dpvoip",
)
