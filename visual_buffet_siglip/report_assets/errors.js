// Runs first: collects uncaught errors and Content-Security-Policy violations
// in window.__reportErrors, so tests (and curious users) can see them.
window.__reportErrors = [];
window.addEventListener("error", function (e) {
  window.__reportErrors.push(String(e.message || e.type) + (e.filename ? " @" + e.lineno + ":" + e.colno : ""));
});
window.addEventListener("unhandledrejection", function (e) {
  window.__reportErrors.push("unhandled rejection: " + String(e.reason));
});
document.addEventListener("securitypolicyviolation", function (e) {
  window.__reportErrors.push("CSP violation: " + e.violatedDirective + " blocked " + (e.blockedURI || "inline code"));
});
