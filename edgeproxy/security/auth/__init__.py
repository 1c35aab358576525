"""
Authentication at the edge: the C{auth} stage (L{edgeproxy.security.auth.stage})
and one module per C{type} of C{[auth:NAME]}: L{basic}, L{jwt},
L{forward}, L{oidc}.  Each type is an L{Authenticator}
(L{edgeproxy.security.auth.base}); the stage does what every type shares
(removing the client's copies of identity fields and C{Authorization},
applying limits keyed on the identity, logging the outcome without the
credential).
"""
