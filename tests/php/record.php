<?php
// Appends one JSON line per request to the file named by the pool's BUSGATE_RECORD env:
// the CGI variables busgate set and the exact payload (base64), so tests check what arrived.
// It records before answering, so a job that is retried shows up once per attempt.
$body = file_get_contents('php://input');
$server = [];
foreach ($_SERVER as $k => $v) {
    if (is_string($v) && (str_starts_with($k, 'HTTP_') || in_array($k, [
        'SCRIPT_FILENAME', 'SCRIPT_NAME', 'REQUEST_URI', 'DOCUMENT_ROOT', 'REQUEST_METHOD',
        'CONTENT_TYPE', 'CONTENT_LENGTH', 'SERVER_PROTOCOL', 'GATEWAY_INTERFACE',
        'SERVER_SOFTWARE', 'REMOTE_ADDR', 'QUERY_STRING'], true))) {
        $server[$k] = $v;
    }
}
$line = json_encode(['server' => $server, 'body_b64' => base64_encode($body), 'post' => $_POST]) . "\n";
file_put_contents(getenv('BUSGATE_RECORD'), $line, FILE_APPEND | LOCK_EX);
// A JSON payload may steer the answer: {"respond_status": 500, "sleep_ms": 100}.
$job = json_decode($body, true);
if (is_array($job) && isset($job['sleep_ms'])) {
    usleep((int)$job['sleep_ms'] * 1000);
}
http_response_code(is_array($job) && isset($job['respond_status']) ? (int)$job['respond_status'] : 200);
echo 'recorded';
