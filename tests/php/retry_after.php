<?php
http_response_code(503);
header('Retry-After: 7');
echo 'busy';
