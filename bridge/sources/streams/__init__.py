"""MoEngage Streams (/moengage/streams/{source})."""
