<?php
// Reports what php-fpm received: selected CGI variables, the body's length and hash, and
// whether it matches the hash the test sent in X-Expect-Sha256.
$body = file_get_contents('php://input');
$hash = hash('sha256', $body);
$server = [];
foreach ($_SERVER as $k => $v) {
    if (is_string($v) && (str_starts_with($k, 'HTTP_') || in_array($k, [
        'SCRIPT_FILENAME', 'SCRIPT_NAME', 'REQUEST_URI', 'DOCUMENT_ROOT', 'REQUEST_METHOD',
        'CONTENT_TYPE', 'CONTENT_LENGTH', 'SERVER_PROTOCOL', 'GATEWAY_INTERFACE',
        'SERVER_SOFTWARE', 'REMOTE_ADDR', 'QUERY_STRING'], true))) {
        $server[$k] = $v;
    }
}
header('Content-Type: application/json');
echo json_encode([
    'length' => strlen($body),
    'sha256' => $hash,
    'match' => isset($_SERVER['HTTP_X_EXPECT_SHA256']) ? $_SERVER['HTTP_X_EXPECT_SHA256'] === $hash : null,
    'server' => $server,
    'post' => $_POST,
    'pid' => getmypid(),
]);
