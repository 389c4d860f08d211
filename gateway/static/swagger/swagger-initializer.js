// Renders /openapi.json into #swagger-ui (a file of its own, so the page needs no inline script).
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null,  // no badge fetched from validator.swagger.io
    tryItOutEnabled: false,
  });
});
