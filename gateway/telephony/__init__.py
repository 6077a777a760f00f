"""Phone calls: telephony media-stream WebSockets (Twilio Media Streams today) run as
native sessions.  ``serializer.py`` is the interface a provider implements,
``twilio.py`` Twilio's, ``socket.py`` the session's side, ``routes.py`` the gateway's
routes; docs/telephony.md says how to wire a number."""
