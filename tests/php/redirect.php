<?php
// A front controller sending the job to a login page, as an expired session would.
header('Location: /login?next=%2Fjobs');
http_response_code(302);
echo 'moved';
