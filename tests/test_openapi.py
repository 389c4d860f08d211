"""schemathesis against the live stack: every operation of gateway/openapi.json, with generated
valid and invalid requests (its examples, coverage and fuzzing phases), must get a documented
answer: a documented status (no 5xx but the documented 502/503/504), content type, headers and
body. Then every process of the stack must still be alive."""
import os
import time

import requests
import schemathesis
from schemathesis.config import SchemathesisConfig

from gateway.app import OPENAPI_DOCUMENT
from tests.test_web import browser  # noqa: F401 (Debian's headless Chromium)

# Fuzzing examples per operation (besides the examples and coverage phases): the whole file takes
# about 10 s with the stack up on 2 busy cores. SCHEMATHESIS_MAX_EXAMPLES=2000 searches harder.
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "100"))


# The document is a static file: the operations are known at collection, one test each; the
# stack's address is given per call. (schemathesis.pytest.from_fixture, which would load the schema
# from the stack fixture, fails under pytest 9.2: it sets the node's `_nodeid`, which is gone.)
schema = schemathesis.openapi.from_path(OPENAPI_DOCUMENT, config=SchemathesisConfig.from_dict({
    "request-timeout": 30,
    "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "database": "none"},
    # Any 5xx but the documented ones is a failure.
    "checks": {"not_a_server_error": {"expected-statuses": ["1xx", "2xx", "3xx", "4xx", "502", "503", "504"]},
               # A schema-valid upload may still be refused: not an image (422), over a limit that
               # is a deployment setting (MAX_IMAGES_PER_REQUEST, MAX_UPLOAD_BYTES, MAX_IMAGE_PIXELS).
               "positive_data_acceptance": {"enabled": False}},
}))


@schema.parametrize()
def test_every_operation_answers_as_documented(case, stack):
    case.call_and_validate(base_url=stack.gateway_url)


def test_stack_survives_the_fuzzing(stack):
    time.sleep(0.5)
    dead = [service.name for service in stack.services if not service.alive()]
    assert not dead, f"died during the fuzzing: {dead}"
    ready = requests.get(f"{stack.gateway_url}/readyz", params={"deep": "1"}, timeout=10)
    assert ready.status_code == 200, ready.text


def test_docs_page_renders_every_operation_from_the_gateway_alone(stack, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    document = requests.get(f"{stack.gateway_url}/openapi.json", timeout=10).json()
    expected = sorted(f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item)
    browser.get(f"{stack.gateway_url}/docs")

    def operations(driver):
        blocks = driver.find_elements(By.CSS_SELECTOR, ".opblock-summary")
        return sorted(f"{b.find_element(By.CLASS_NAME, 'opblock-summary-method').text} "
                      f"{b.find_element(By.CLASS_NAME, 'opblock-summary-path').get_attribute('data-path')}"
                      for b in blocks) or None
    assert WebDriverWait(browser, 30).until(operations) == expected
    assert document["info"]["title"] in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(f"{stack.gateway_url}/") for url in loaded), loaded
